"""Write CT slices as RSNA-style DICOM files (used by the synthetic dataset and by the tests).

Real RSNA files carry a small set of header elements (about 22) with UIDs hashed to ``ID_<hex>``; the pixel
data is stored with one of several scanner conventions, which :class:`StorageVariant` describes and
:func:`encode_hu` produces from Hounsfield units.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

#: Implementation class UID used for the file meta of every file this package writes.
_IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1226.1"


@dataclass(frozen=True)
class StorageVariant:
    """How a scanner stores HU in the pixel buffer.

    Attributes:
        signed: PixelRepresentation 1 (int16) instead of 0 (uint16).
        intercept: RescaleIntercept (−1024 or 0 in practice).
        slope: RescaleSlope.
        bits_stored: 12 or 16.
        wrap12: reproduce the RSNA 12-bit quirk: unsigned 12-bit data whose air has wrapped around, with an
            intercept of 0 (> −100); decoders must undo it. ``signed``/``intercept`` are ignored.
    """

    signed: bool = True
    intercept: float = -1024.0
    slope: float = 1.0
    bits_stored: int = 16
    wrap12: bool = False


def encode_hu(hu: np.ndarray, variant: StorageVariant) -> np.ndarray:
    """Turn HU into the stored pixel values of ``variant``.

    Args:
        hu: (H, W) Hounsfield units (float or int).
        variant: the storage convention.

    Returns:
        (H, W) int16 or uint16 array to put in PixelData.
    """
    hu = np.asarray(hu, dtype=np.float64)
    if variant.wrap12:
        # The RSNA quirk: unsigned 12-bit data with intercept 0 where negative HU wrapped modulo 4096, so air
        # (−1000) is stored as 3096. Decoders undo it with x = stored + 1000, x −= 4096 where x ≥ 4096,
        # HU = x − 1000, which is exact for HU in [−1000, 3095]: clip to that range first.
        x = np.rint(np.clip(hu, -1000, 3095)).astype(np.int64) % 4096
        return x.astype(np.uint16)
    stored = np.rint((hu - variant.intercept) / variant.slope).astype(np.int64)
    if variant.signed:
        lo, hi = -(2 ** (variant.bits_stored - 1)), 2 ** (variant.bits_stored - 1) - 1
        return np.clip(stored, lo, hi).astype(np.int16)
    return np.clip(stored, 0, 2**variant.bits_stored - 1).astype(np.uint16)


def variant_intercept(variant: StorageVariant) -> float:
    """The RescaleIntercept written for ``variant`` (the 12-bit quirk files say 0)."""
    return 0.0 if variant.wrap12 else variant.intercept


def meta_instance_uid(sop_uid: str) -> str:
    """The file meta's MediaStorageSOPInstanceUID: ``sop_uid`` itself when it is a valid UID (as DICOM requires),
    else a valid UID derived from it (Kaggle replaced UIDs with ``ID_<hex>``; the meta must still hold a UID)."""
    return sop_uid if UID(sop_uid).is_valid else generate_uid(entropy_srcs=[sop_uid])


@dataclass(frozen=True)
class SliceGeometry:
    """Where a slice sits in patient space (DICOM LPS, millimetres).

    Attributes:
        ipp: ImagePositionPatient, centre of the first (top-left) pixel.
        iop: ImageOrientationPatient: row direction cosines then column direction cosines.
        pixel_spacing: (row spacing, column spacing) = (distance between rows, distance between columns).
        slice_thickness: nominal thickness written to the header.
    """

    ipp: tuple[float, float, float]
    iop: tuple[float, float, float, float, float, float]
    pixel_spacing: tuple[float, float]
    slice_thickness: float = 5.0


def write_ct_dicom(
    path: str | os.PathLike[str],
    hu: np.ndarray,
    geometry: SliceGeometry,
    *,
    sop_uid: str,
    series_uid: str,
    study_uid: str,
    patient_id: str,
    instance_number: int,
    variant: StorageVariant = StorageVariant(),
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write one CT slice with the header elements the RSNA files carry.

    Args:
        path: output file.
        hu: (rows, cols) Hounsfield units.
        geometry: position, orientation and spacing of the slice.
        sop_uid, series_uid, study_uid, patient_id: hashed identifiers (``ID_<hex>``).
        instance_number: InstanceNumber (need not follow the spatial order).
        variant: pixel storage convention.
        extra: more elements by keyword (``SeriesDescription``, ``ConvolutionKernel``, ``ImageType``, ...), set
            last, so they may also replace the ones above: ``WindowCenter`` / ``WindowWidth`` (40 / 80; a list
            writes a multi-valued tag), ``Modality`` (CT; tests write non-CT files with it).
    """
    stored = encode_hu(hu, variant)
    rows, cols = stored.shape

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = meta_instance_uid(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID

    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    with warnings.catch_warnings():
        # Kaggle's "ID_<hex>" identifiers are not valid UI values; keep them exactly like the real data.
        warnings.simplefilter("ignore", UserWarning)
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.StudyID = ""
    ds.InstanceNumber = int(instance_number)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in geometry.ipp]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in geometry.iop]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [f"{geometry.pixel_spacing[0]:.6f}", f"{geometry.pixel_spacing[1]:.6f}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if variant.wrap12 else variant.bits_stored
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if (variant.signed and not variant.wrap12) else 0
    ds.WindowCenter = 40.0
    ds.WindowWidth = 80.0
    ds.RescaleIntercept = f"{variant_intercept(variant):g}"
    ds.RescaleSlope = f"{variant.slope:g}"
    ds.SliceThickness = f"{geometry.slice_thickness:g}"
    ds.PixelData = stored.tobytes()
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the ID_<hex> UIDs are validated again on write
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
