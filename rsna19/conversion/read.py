"""Read the slices of one series: pixels in HU plus the geometry that orders and corrects them.

The header of every file is read by the index's own reader (:func:`rsna19.io.dicom_header.read_slice_headers`), so
a file converts exactly when ``rsna19 index`` and ``predict-study`` accept it, with the same reason when not; the
pixels are then decoded, uncompressed 16-bit data straight from the buffer through the HU lookup table (anything
else, compressed, big-endian or 8/32-bit, takes pydicom's general path).
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
import pydicom.config

from rsna19.io.dicom import SliceGeometry
from rsna19.io.dicom_header import read_slice_headers
from rsna19.io.hu import dataset_to_hu, decode_stored, frame_to_hu, native_to_hu

#: Little-endian transfer syntaxes whose pixel data is a plain buffer.
_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"}


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


def read_slice(path: str | os.PathLike[str]) -> Slice:
    """Read one single-frame CT file with its pixels and convert them to HU.

    Raises:
        ValueError: with a one-line reason (the index's: not CT, no geometry, truncated …; undecodable pixels; a
            multi-frame file, read with :func:`read_file_slices`).
    """
    with lenient_reading():
        return read_slice_unguarded(path)


def read_slice_unguarded(path: str | os.PathLike[str]) -> Slice:
    """:func:`read_slice` for callers that already hold :func:`lenient_reading` (one context per series)."""
    slices = read_file_slices_unguarded(path)
    if slices[0].frame:
        raise ValueError("multi-frame image: read it with read_file_slices")
    return slices[0]


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
        ValueError: with a one-line reason (the index's reason for the header, undecodable pixels, a frame number
            the file does not have …).
    """
    with lenient_reading():
        return read_file_slices_unguarded(path, frames)


def read_file_slices_unguarded(path: str | os.PathLike[str], frames: Sequence[int] | None = None) -> list[Slice]:
    """:func:`read_file_slices` for callers that already hold :func:`lenient_reading`."""
    rows = read_slice_headers(path)
    if isinstance(rows, str):
        raise ValueError(rows)
    ds = pydicom.dcmread(path)
    if not rows[0]["frame"]:
        return [_slice(rows[0], _single_hu(ds, rows[0]))]
    wanted = list(range(1, len(rows) + 1)) if frames is None else [int(f) for f in frames]
    bad = [f for f in wanted if not 1 <= f <= len(rows)]
    if bad:
        raise ValueError(f"frame {bad[0]} does not exist: the file has {len(rows)} frames")
    stored = decode_stored(ds)
    return [_slice(rows[f - 1], frame_to_hu(stored[f - 1], **_rescale(rows[f - 1]))) for f in wanted]


def _rescale(row: dict[str, Any]) -> dict[str, Any]:
    """The stored → HU parameters of a header row."""
    return {
        "slope": row["rescale_slope"],
        "intercept": row["rescale_intercept"],
        "bits_stored": row["bits_stored"],
        "pixel_representation": row["pixel_representation"],
    }


def _single_hu(ds: pydicom.Dataset, row: dict[str, Any]) -> np.ndarray:
    """(rows, cols) int16 HU of a single-frame file: straight from a native 16-bit buffer, else pydicom's decoders."""
    pixels = ds.get("PixelData")
    if (
        row["transfer_syntax"] in _NATIVE_LE
        and row["bits_allocated"] == 16
        and isinstance(pixels, bytes)
        and len(pixels) >= 2 * row["rows"] * row["cols"]
        and int(ds.get("SamplesPerPixel", 1) or 1) == 1
    ):
        return native_to_hu(pixels, row["rows"], row["cols"], **_rescale(row))
    return dataset_to_hu(ds)  # compressed, big-endian or unusual bit depths: pydicom's decoders


def _slice(row: dict[str, Any], hu: np.ndarray) -> Slice:
    """A :class:`Slice` from a header row and its pixels."""
    thickness = float(row["slice_thickness"])
    return Slice(
        path=str(row["path"]),
        sop_uid=row["sop_uid"],
        series_uid=row["series_uid"],
        study_uid=row["study_uid"],
        patient_id=row["patient_id"],
        hu=hu,
        ipp=np.array([row["ipp_x"], row["ipp_y"], row["ipp_z"]], dtype=np.float64),
        iop=np.array([row[f"iop_{i}"] for i in range(6)], dtype=np.float64),
        pixel_spacing=(float(row["pixel_spacing_row"]), float(row["pixel_spacing_col"])),
        slice_thickness=thickness if math.isfinite(thickness) else 0.0,
        frame=int(row["frame"]),
    )


def describe_error(exc: BaseException) -> str:
    """One-line reason for a failed read, without the file name (the report has its own path column)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ValueError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
