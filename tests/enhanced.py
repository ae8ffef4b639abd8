"""Enhanced CT (multi-frame) test files: a whole series in one file with per-frame functional groups.

rsna19 reads such files (``rsna19/io/multiframe.py``) but never writes them; the tests write them with this.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, EnhancedCTImageStorage, ExplicitVRLittleEndian

from rsna19.io.dicom_write import SliceGeometry, StorageVariant, encode_hu, meta_instance_uid, variant_intercept


def write_enhanced_ct_dicom(
    path: str | os.PathLike[str],
    hu: np.ndarray,
    geometries: list[SliceGeometry],
    *,
    sop_uid: str,
    series_uid: str,
    study_uid: str,
    patient_id: str,
    variants: list[StorageVariant] | None = None,
    shared_geometry: bool = True,
) -> None:
    """Write a whole series as one Enhanced CT Image (multi-frame) file with per-frame functional groups.

    Each frame gets a PlanePositionSequence and a PixelValueTransformationSequence (its own rescale, so frames
    may use different storage variants); orientation, pixel measures and the VOI window go to the Shared
    Functional Groups Sequence, or to every frame with ``shared_geometry=False``.

    Args:
        path: output file.
        hu: (frames, rows, cols) Hounsfield units, one frame per entry of ``geometries``.
        geometries: per frame, its position (orientation, spacing and thickness must agree when shared).
        sop_uid, series_uid, study_uid, patient_id: identifiers.
        variants: per-frame storage convention (signed-ness and bits must agree between frames); default signed
            16 bit with intercept −1024 for all.
        shared_geometry: put orientation and pixel measures in the shared functional groups.
    """
    hu = np.asarray(hu)
    n = hu.shape[0]
    if len(geometries) != n:
        raise ValueError(f"{len(geometries)} geometries for {n} frames")
    variants = variants or [StorageVariant()] * n
    if len({(v.signed and not v.wrap12, v.bits_stored if not v.wrap12 else 12) for v in variants}) != 1:
        raise ValueError("frames must share PixelRepresentation and BitsStored")
    stored = np.stack([encode_hu(h, v) for h, v in zip(hu, variants)])
    first, v0 = geometries[0], variants[0]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = meta_instance_uid(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds.SOPClassUID = EnhancedCTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = n
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[1:]
    ds.BitsAllocated = 16
    ds.BitsStored = 12 if v0.wrap12 else v0.bits_stored
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if (v0.signed and not v0.wrap12) else 0

    def item(**values: object) -> Sequence:
        entry = Dataset()
        for key, value in values.items():
            setattr(entry, key, value)
        return Sequence([entry])

    def orientation(g: SliceGeometry) -> Sequence:
        return item(ImageOrientationPatient=[f"{v:.8f}" for v in g.iop])

    def measures(g: SliceGeometry) -> Sequence:
        return item(
            PixelSpacing=[f"{g.pixel_spacing[0]:.6f}", f"{g.pixel_spacing[1]:.6f}"],
            SliceThickness=f"{g.slice_thickness:g}",
        )

    shared = Dataset()
    shared.FrameVOILUTSequence = item(WindowCenter="40", WindowWidth="80")
    if shared_geometry:
        shared.PlaneOrientationSequence = orientation(first)
        shared.PixelMeasuresSequence = measures(first)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k, (g, v) in enumerate(zip(geometries, variants)):
        fg = Dataset()
        fg.FrameContentSequence = item(InStackPositionNumber=k + 1)
        fg.PlanePositionSequence = item(ImagePositionPatient=[f"{c:.6f}" for c in g.ipp])
        fg.PixelValueTransformationSequence = item(
            RescaleIntercept=f"{variant_intercept(v):g}", RescaleSlope=f"{v.slope:g}", RescaleType="HU"
        )
        if not shared_geometry:
            fg.PlaneOrientationSequence = orientation(g)
            fg.PixelMeasuresSequence = measures(g)
        per_frame.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
