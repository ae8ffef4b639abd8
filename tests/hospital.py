"""A hospital-like head-CT study written with the project's DICOM writer and the synthetic phantom.

One synthetic head (with hemorrhages) from :mod:`rsna19.synth` is rendered as several series of one study, each
with the headers a scanner writes: a soft-tissue 5 mm axial, a bone-kernel copy at the same positions, a
0.625 mm reconstruction of the same head, a scout, a CTA-like series, and a re-export copy of the soft-tissue
series under a new series UID. The soft-tissue series is stored JPEG Lossless (1.2.840.10008.1.2.4.70, as PACS
exports often are; encoded with imagecodecs' libjpeg-turbo), its copy uncompressed. Thinner slices get
proportionally more noise (noise SD ∝ 1/√thickness), as on a scanner. Every UID is a valid DICOM UID and the files
carry the patient and study modules, so DICOM outputs made from them can be validated.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import pydicom
from enhanced import write_enhanced_ct_dicom
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, JPEGLosslessSV1
from scipy.ndimage import gaussian_filter

from rsna19.io.dicom_write import SliceGeometry, write_ct_dicom
from rsna19.synth.cq500 import series_geometry
from rsna19.synth.phantom import render
from rsna19.synth.plan import SeriesPlan, make_plan
from rsna19.synth.presets import Preset

THICK_MM = 5.0
THIN_MM = 0.625
N_THICK = 8

SOFT = {"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"], "ConvolutionKernel": "H30s", "BodyPartExamined": "HEAD"}
STUDY = {
    "StudyDescription": "CT HEAD WITHOUT CONTRAST",
    "SOPClassUID": CTImageStorage,
    "PatientName": "Hospital^Test",
    "PatientBirthDate": "19600101",
    "PatientSex": "O",
    "StudyDate": "20240301",
    "StudyTime": "083000",
    "AccessionNumber": "A0001",
    "StudyID": "1",
    "ReferringPhysicianName": "",
}
#: Series of :func:`write_hospital_study`, in UID order (``<study>.1`` … ``<study>.6``).
SERIES = ("soft", "bone", "thin", "scout", "cta", "copy")


def head_plan(seed: int = 5, size: int = 64) -> SeriesPlan:
    """One untilted synthetic series plan with at least one bleed (the head and bleeds every series shares)."""
    preset = Preset(
        name="hospital",
        image_size=size,
        n_train_studies=1,
        n_test_studies=1,
        n_repeat_patients=0,
        n_slices=(N_THICK, N_THICK),
        table_step=(THICK_MM, THICK_MM),
        slab_offset=(0.0, 4.0),
        bleed_fraction=1.0,
        tilt_fraction=0.0,
    )
    plan = make_plan(preset, seed)[-1]
    return dataclasses.replace(plan, corrupt_slice=None)


def write_series(
    folder: Path,
    plan: SeriesPlan,
    *,
    study_uid: str,
    series_uid: str,
    step: float,
    attrs: dict[str, Any],
    sharpen: bool = False,
    window: tuple[float, float] = (40.0, 80.0),
    add_hu: float = 0.0,
) -> list[Path]:
    """Render ``plan``'s head as one series of slices ``step`` mm apart covering the plan's 5 mm slab.

    The thin slices tile the thick ones exactly (8 × 0.625 mm per 5 mm slice, centred alike). ``attrs`` are set on
    every file after writing (ImageType, ConvolutionKernel, SeriesDescription, ...).
    """
    geom = series_geometry(plan, step)
    n = geom.n_slices
    rng = np.random.default_rng(int(step * 1000) + int(sharpen))
    circle = geom.recon_circle()
    noise = plan.noise_sd * math.sqrt(THICK_MM / step)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        hu, _ = render(plan.head, plan.bleeds, geom.pixel_points(k))
        hu = gaussian_filter(hu + rng.normal(0.0, noise, hu.shape), plan.blur_px) + add_hu
        if sharpen:  # a bone kernel: edges enhanced, noise amplified
            hu = hu + 2.0 * (hu - gaussian_filter(hu, 1.0)) + rng.normal(0.0, 40.0, hu.shape)
        hu[~circle] = -1024.0
        path = folder / f"IM{k:04d}"
        sg = geom.slice_geometry(k)
        write_ct_dicom(
            path,
            hu,
            SliceGeometry(sg.ipp, sg.iop, sg.pixel_spacing, step),
            sop_uid=f"{series_uid}.{k + 1}",
            series_uid=series_uid,
            study_uid=study_uid,
            patient_id=plan.patient_id,
            instance_number=k + 1,
            extra={"WindowCenter": window[0], "WindowWidth": window[1]},
        )
        _set(path, {**STUDY, **attrs})
        paths.append(path)
    return paths


def write_localizer(folder: Path, plan: SeriesPlan, *, study_uid: str, series_uid: str) -> Path:
    """A one-image scout (coronal projection, ImageType LOCALIZER)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "SCOUT"
    size = plan.geometry.rows
    img = np.full((size, size), -1024.0)
    img[size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 300.0
    write_ct_dicom(
        path,
        img,
        SliceGeometry((-128.0, 0.0, 200.0), (1.0, 0.0, 0.0, 0.0, 0.0, -1.0), (4.0, 4.0)),
        sop_uid=f"{series_uid}.1",
        series_uid=series_uid,
        study_uid=study_uid,
        patient_id=plan.patient_id,
        instance_number=1,
    )
    _set(path, {**STUDY, "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"], "SeriesDescription": "Topogram 0.6 T20f"})
    return path


def transcode_jpeg_lossless(path: Path) -> None:
    """Re-encode a single-frame file as JPEG Lossless SV1 (1.2.840.10008.1.2.4.70) in place, bit for bit lossless."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
        cells = stored.view(np.uint16) if stored.dtype == np.int16 else stored  # the codec takes unsigned samples
        frame = imagecodecs.jpeg8_encode(cells, bitspersample=int(ds.BitsStored), lossless=True, predictor=1)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.save_as(path, enforce_file_format=True)


def write_hospital_study(root: Path, plan: SeriesPlan, study_uid: str = "1.2.826.0.1.3680043.10.1226.900") -> dict:
    """The six series of a hospital-like study under ``root`` (:data:`SERIES`); returns series name → series UID."""
    uid = {name: f"{study_uid}.{i + 1}" for i, name in enumerate(SERIES)}
    common = {"study_uid": study_uid}
    soft = {**SOFT, "SeriesDescription": "Head 5.0 H30s"}
    for path in write_series(root / "soft", plan, series_uid=uid["soft"], step=THICK_MM, attrs=soft, **common):
        transcode_jpeg_lossless(path)
    # The same images re-exported under a new series UID (and new SOP instance UIDs), stored uncompressed.
    write_series(root / "copy", plan, series_uid=uid["copy"], step=THICK_MM, attrs=soft, **common)
    write_series(
        root / "bone",
        plan,
        series_uid=uid["bone"],
        step=THICK_MM,
        sharpen=True,
        window=(600.0, 2800.0),
        attrs={**SOFT, "ConvolutionKernel": "H70h", "SeriesDescription": "Head 5.0 H70h"},
        **common,
    )
    write_series(
        root / "thin",
        plan,
        series_uid=uid["thin"],
        step=THIN_MM,
        attrs={**SOFT, "SeriesDescription": "Head 0.6 H30s"},
        **common,
    )
    write_localizer(root / "scout", plan, series_uid=uid["scout"], **common)
    write_series(
        root / "cta",
        plan,
        series_uid=uid["cta"],
        step=THICK_MM,
        add_hu=60.0,
        attrs={**SOFT, "SeriesDescription": "CTA Head", "ContrastBolusAgent": "Iohexol 350"},
        **common,
    )
    return uid


def _set(path: Path, attrs: dict[str, Any]) -> None:
    ds = pydicom.dcmread(path)
    for key, value in attrs.items():
        setattr(ds, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds.save_as(path, enforce_file_format=True)


def enhanced_copy(
    files: list[Path], path: Path, *, sop_uid: str, series_uid: str, study_uid: str, patient_id: str, reverse: bool
) -> int:
    """The single-frame CT ``files`` as one multi-frame Enhanced CT file at ``path`` (same HU and geometry; frames
    in reverse order with ``reverse``); returns the number of frames."""
    dss = [pydicom.dcmread(f) for f in files]
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in dss])
    geoms = [
        SliceGeometry(
            tuple(map(float, ds.ImagePositionPatient)),
            tuple(map(float, ds.ImageOrientationPatient)),
            tuple(map(float, ds.PixelSpacing)),
            float(ds.SliceThickness),
        )
        for ds in dss
    ]
    if reverse:
        hu, geoms = hu[::-1], geoms[::-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_enhanced_ct_dicom(
        path, hu, geoms, sop_uid=sop_uid, series_uid=series_uid, study_uid=study_uid, patient_id=patient_id
    )
    return len(dss)
