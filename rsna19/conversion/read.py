"""Read the slices of one series: pixels in HU plus the geometry that orders and corrects them.

Speed matters here (870k files): the ~16 header values are decoded from pydicom's raw element bytes (pydicom's
own per-element conversion costs about as much as decoding the pixels), and uncompressed 16-bit pixel data goes
straight from the buffer through the HU lookup table. Anything else (compressed, big-endian, 8/32-bit) takes
pydicom's general path.
"""

from __future__ import annotations

import contextlib
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from pydicom.dataelem import RawDataElement

from rsna19.io.dicom import TAGS, SliceGeometry
from rsna19.io.hu import dataset_to_hu, decode_stored, frame_to_hu, native_to_hu
from rsna19.io.multiframe import frame_headers, frame_sop_uid, is_multiframe

#: Little-endian transfer syntaxes whose pixel data is a plain buffer.
_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}
_US = {True: struct.Struct("<H").unpack, False: struct.Struct(">H").unpack}


@dataclass
class Slice:
    """One decoded CT slice.

    Attributes:
        path: the file.
        sop_uid, series_uid, study_uid, patient_id: identifiers from the header.
        hu: (rows, cols) int16 Hounsfield units.
        ipp: (3,) ImagePositionPatient.
        iop: (6,) ImageOrientationPatient.
        pixel_spacing: (Δr, Δc) mm.
        slice_thickness: SliceThickness (mm, 0 where absent).
        frame: 1-based frame number within a multi-frame file, 0 for a single-frame file.
    """

    path: str
    sop_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    hu: np.ndarray
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_thickness: float
    frame: int = 0

    def geometry(self) -> SliceGeometry:
        """What must agree between slices stacked together (:func:`rsna19.io.dicom.pick_geometry`)."""
        spacing = (float(self.pixel_spacing[0]), float(self.pixel_spacing[1]))
        return SliceGeometry(tuple(self.hu.shape), tuple(float(v) for v in self.iop), spacing)


@contextlib.contextmanager
def lenient_reading() -> Iterator[None]:
    """Read values without validating them: Kaggle's ``ID_<hex>`` UIDs are not valid UI values, and pydicom would
    warn and log once per element and file (millions of lines on the RSNA data)."""
    settings = pydicom.config.settings
    before = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        settings.reading_validation_mode = before


class _Header:
    """Values of a dataset's elements, decoded from the raw bytes where pydicom has not converted them yet."""

    def __init__(self, ds: pydicom.Dataset) -> None:
        self.ds = ds

    def _elem(self, tag: int) -> Any:
        try:
            return self.ds.get_item(tag)
        except KeyError:
            return None

    def text(self, tag: int) -> list[str] | None:
        """The backslash-separated values of a text element (DS, IS, CS, UI, LO …); None if absent or empty."""
        elem = self._elem(tag)
        if elem is None:
            return None
        value = elem.value
        if isinstance(elem, RawDataElement):
            if not value:
                return None
            parts = value.decode("latin-1").split("\\")
        elif value is None or value == "":
            return None
        elif isinstance(value, list | tuple | pydicom.multival.MultiValue):
            parts = [str(v) for v in value]
        else:
            parts = [str(value)]
        parts = [p.strip(" \x00") for p in parts]
        return parts if any(parts) else None

    def string(self, tag: int, default: str = "") -> str:
        """The first value of a text element."""
        parts = self.text(tag)
        return parts[0] if parts else default

    def floats(self, tag: int, n: int, name: str) -> np.ndarray:
        """Exactly ``n`` finite numbers, or a ValueError naming the element."""
        parts = self.text(tag)
        if parts is None:
            raise ValueError(f"no {name}")
        try:
            out = np.asarray([float(p) for p in parts], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{name} {parts} is not numeric") from None
        if out.shape != (n,) or not np.all(np.isfinite(out)):
            raise ValueError(f"{name} {parts} is not {n} finite numbers")
        return out

    def number(self, tag: int, default: float) -> float:
        """The first value of a DS/IS element as float (multi-valued tags take their first value)."""
        parts = self.text(tag)
        if not parts or not parts[0]:
            return default
        try:
            return float(parts[0])
        except ValueError:
            raise ValueError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) {parts[0]!r} is not numeric") from None

    def us(self, tag: int, default: int | None = None) -> int | None:
        """An unsigned short (US) element."""
        elem = self._elem(tag)
        if elem is None:
            return default
        if isinstance(elem, RawDataElement):
            if len(elem.value) < 2:
                return default
            return int(_US[bool(elem.is_little_endian)](elem.value[:2])[0])
        value = elem.value
        if isinstance(value, list | tuple | pydicom.multival.MultiValue):
            value = value[0] if value else default
        return default if value is None else int(value)


def _hu(ds: pydicom.Dataset, h: _Header) -> np.ndarray:
    rows, cols = h.us(TAGS["Rows"]), h.us(TAGS["Columns"])
    if not rows or not cols:
        raise ValueError("no Rows/Columns")
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    pixels = h._elem(TAGS["PixelData"])
    if pixels is None:
        raise ValueError("no pixel data")
    frames = h.number(TAGS["NumberOfFrames"], 1.0)
    if (
        ts in _NATIVE_LE
        and h.us(TAGS["BitsAllocated"]) == 16
        and h.us(TAGS["SamplesPerPixel"], 1) == 1
        and frames == 1.0
        and isinstance(pixels.value, bytes)
    ):
        return native_to_hu(
            pixels.value,
            rows,
            cols,
            slope=h.number(TAGS["RescaleSlope"], 1.0),
            intercept=h.number(TAGS["RescaleIntercept"], 0.0),
            bits_stored=h.us(TAGS["BitsStored"], 16) or 16,
            pixel_representation=h.us(TAGS["PixelRepresentation"], 0) or 0,
        )
    return dataset_to_hu(ds)  # compressed, big-endian or unusual bit depths: pydicom's decoders


def read_slice(path: str | os.PathLike[str]) -> Slice:
    """Read one CT file with its pixels and convert them to HU.

    Raises:
        ValueError: with a one-line reason (not CT, no geometry, undecodable pixels …); OSError for unreadable
            files; pydicom's InvalidDicomError for non-DICOM files.
    """
    with lenient_reading():
        return read_slice_unguarded(path)


def read_slice_unguarded(path: str | os.PathLike[str]) -> Slice:
    """:func:`read_slice` for callers that already hold :func:`lenient_reading` (one context per series)."""
    return _single_slice(path, pydicom.dcmread(path))


def _single_slice(path: str | os.PathLike[str], ds: pydicom.Dataset) -> Slice:
    h = _Header(ds)
    modality = h.string(TAGS["Modality"])
    if modality and modality != "CT":
        raise ValueError(f"not CT (Modality={modality})")
    if is_multiframe(ds):
        raise ValueError("multi-frame image: read it with read_file_slices")
    ipp = h.floats(TAGS["ImagePositionPatient"], 3, "ImagePositionPatient")
    iop = _check_iop(h.floats(TAGS["ImageOrientationPatient"], 6, "ImageOrientationPatient"))
    spacing = _check_spacing(h.floats(TAGS["PixelSpacing"], 2, "PixelSpacing"))
    hu = _hu(ds, h)
    return Slice(
        path=str(path),
        sop_uid=h.string(TAGS["SOPInstanceUID"]),
        series_uid=h.string(TAGS["SeriesInstanceUID"]),
        study_uid=h.string(TAGS["StudyInstanceUID"]),
        patient_id=h.string(TAGS["PatientID"]),
        hu=hu,
        ipp=ipp,
        iop=iop,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        slice_thickness=h.number(TAGS["SliceThickness"], 0.0),
    )


def _check_iop(iop: np.ndarray) -> np.ndarray:
    if np.linalg.norm(np.cross(iop[:3], iop[3:])) < 0.5:
        raise ValueError(f"ImageOrientationPatient {iop.tolist()} has parallel row and column vectors")
    return iop


def _check_spacing(spacing: np.ndarray) -> np.ndarray:
    if np.any(spacing <= 0):
        raise ValueError(f"PixelSpacing {spacing.tolist()} is not positive")
    return spacing


def _vector(values: list[float] | None, n: int, name: str, frame: int) -> np.ndarray:
    if values is None:
        raise ValueError(f"frame {frame}: no {name}")
    out = np.asarray(values, dtype=np.float64)
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise ValueError(f"frame {frame}: {name} {values} is not {n} finite numbers")
    return out


def read_file_slices(path: str | os.PathLike[str], frames: Sequence[int] | None = None) -> list[Slice]:
    """Read the slices a file holds: itself for a single-frame file, its frames for a multi-frame one.

    Args:
        path: the file.
        frames: 1-based frames to read from a multi-frame file, None for all (ignored for a single-frame file).

    Returns:
        The slices; frames of a multi-frame file carry ``frame`` and the slice UID ``<SOPInstanceUID>.f<frame>``,
        with position, orientation, spacing and rescale from the functional groups
        (:mod:`rsna19.io.multiframe`).

    Raises:
        ValueError: with a one-line reason (not CT, no geometry for a frame, undecodable pixels, a frame number
            the file does not have …), as :func:`read_slice`.
    """
    with lenient_reading():
        return read_file_slices_unguarded(path, frames)


def read_file_slices_unguarded(path: str | os.PathLike[str], frames: Sequence[int] | None = None) -> list[Slice]:
    """:func:`read_file_slices` for callers that already hold :func:`lenient_reading`."""
    ds = pydicom.dcmread(path)
    if not is_multiframe(ds):
        return [_single_slice(path, ds)]
    h = _Header(ds)
    modality = h.string(TAGS["Modality"])
    if modality and modality != "CT":
        raise ValueError(f"not CT (Modality={modality})")
    headers = frame_headers(ds)
    wanted = list(range(1, len(headers) + 1)) if frames is None else [int(f) for f in frames]
    bad = [f for f in wanted if not 1 <= f <= len(headers)]
    if bad:
        raise ValueError(f"frame {bad[0]} does not exist: the file has {len(headers)} frames")
    geometry = {}
    for f in wanted:
        fh = headers[f - 1]
        ipp = _vector(fh.ipp, 3, "ImagePositionPatient", f)
        iop = _check_iop(_vector(fh.iop, 6, "ImageOrientationPatient", f))
        spacing = _check_spacing(_vector(fh.pixel_spacing, 2, "PixelSpacing", f))
        geometry[f] = (ipp, iop, spacing)
    stored = decode_stored(ds)
    sop = h.string(TAGS["SOPInstanceUID"])
    bits_stored = h.us(TAGS["BitsStored"], 16) or 16
    representation = h.us(TAGS["PixelRepresentation"], 0) or 0
    out = []
    for f in wanted:
        fh = headers[f - 1]
        ipp, iop, spacing = geometry[f]
        hu = frame_to_hu(
            stored[f - 1],
            slope=fh.slope if fh.slope is not None else h.number(TAGS["RescaleSlope"], 1.0),
            intercept=fh.intercept if fh.intercept is not None else h.number(TAGS["RescaleIntercept"], 0.0),
            bits_stored=bits_stored,
            pixel_representation=representation,
        )
        thickness = fh.slice_thickness if fh.slice_thickness is not None else h.number(TAGS["SliceThickness"], 0.0)
        out.append(
            Slice(
                path=str(path),
                sop_uid=frame_sop_uid(sop, f),
                series_uid=h.string(TAGS["SeriesInstanceUID"]),
                study_uid=h.string(TAGS["StudyInstanceUID"]),
                patient_id=h.string(TAGS["PatientID"]),
                hu=hu,
                ipp=ipp,
                iop=iop,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                slice_thickness=float(thickness),
                frame=f,
            )
        )
    return out


def describe_error(exc: BaseException) -> str:
    """One-line reason for a failed read, without the file name (the report has its own path column)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ValueError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
