"""Read the slices of one series: pixels in HU plus the geometry that orders and corrects them."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pydicom
import pydicom.config

from rsna19.io.hu import dataset_to_hu, first_value


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

    def geometry_key(self) -> tuple:
        """What must agree between slices stacked together: shape, orientation, pixel spacing."""
        return (
            self.hu.shape,
            tuple(np.round(self.iop, 3).tolist()),
            tuple(round(v, 4) for v in self.pixel_spacing),
        )


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


def _floats(value: object, n: int, name: str) -> np.ndarray:
    if value is None:
        raise ValueError(f"no {name}")
    out = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise ValueError(f"{name} {list(value)} is not {n} finite numbers")  # type: ignore[call-overload]
    return out


def read_slice(path: str | os.PathLike[str]) -> Slice:
    """Read one CT file with its pixels and convert them to HU.

    Raises:
        ValueError: with a one-line reason (not CT, no geometry, undecodable pixels …); OSError for unreadable
            files; pydicom's InvalidDicomError for non-DICOM files.
    """
    with lenient_reading():
        ds = pydicom.dcmread(path)
        modality = str(ds.get("Modality", ""))
        if modality and modality != "CT":
            raise ValueError(f"not CT (Modality={modality})")
        ipp = _floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient")
        iop = _floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient")
        if np.linalg.norm(np.cross(iop[:3], iop[3:])) < 0.5:
            raise ValueError(f"ImageOrientationPatient {iop.tolist()} has parallel row and column vectors")
        ps = ds.get("PixelSpacing")
        spacing = _floats(ps, 2, "PixelSpacing")
        if np.any(spacing <= 0):
            raise ValueError(f"PixelSpacing {spacing.tolist()} is not positive")
        hu = dataset_to_hu(ds)
        return Slice(
            path=str(path),
            sop_uid=str(ds.get("SOPInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            study_uid=str(ds.get("StudyInstanceUID", "")),
            patient_id=str(ds.get("PatientID", "")),
            hu=hu,
            ipp=ipp,
            iop=iop,
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            slice_thickness=first_value(ds.get("SliceThickness"), 0.0) or 0.0,
        )


def describe_error(exc: BaseException) -> str:
    """One-line reason for a failed read, without the file name (the report has its own path column)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ValueError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
