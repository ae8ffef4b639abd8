"""Every kind of DICOM object rsna19 writes, from a small synthetic head series, without a bundle (for
tests/test_dicom_conformance.py and tests/test_pacs_dicom.py)."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pydicom
from hospital import SOFT, THICK_MM, enhanced_copy, head_plan, write_series

from rsna19.conversion.series import convert_series
from rsna19.core.calibration import apply_study_model
from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.inference.dicom_out import write_study_dicom
from rsna19.inference.seg_out import BleedMap, write_seg
from rsna19.io.multiframe import frame_sop_uid

STUDY_UID = "1.2.826.0.1.3680043.10.1226.77"
IDENTITY = {"rsna19_version": "0.0-test", "bundle_sha256": "c0ffee" * 10 + "abcd", "bundle_version": 3}


def _model(any_threshold: float) -> dict:
    return {
        "score": "max",
        "method": "platt",
        "classes": {
            c: {"a": 1.0, "b": 0.0, "threshold": any_threshold if c == "any" else 0.1, "target_sensitivity": 0.95}
            for c in CLASSES
        },
    }


def write_objects(root: Path, study: str = STUDY_UID) -> dict[str, object]:
    """Every kind of object under ``root``: name → path (``src`` → the source CT files, ``mf`` → the Enhanced CT
    file, ``negative_result`` → the negative study's result)."""
    paths = write_series(
        root / "src", head_plan(), study_uid=study, series_uid=f"{study}.1", step=THICK_MM,
        attrs={**SOFT, "SeriesDescription": "Head 5.0 H30s"},
    )  # fmt: skip
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = f"{study}.99"
        ds.save_as(p, enforce_file_format=True)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    rng = np.random.default_rng(0)
    slices = pd.DataFrame({"sop_uid": uids})
    for c in PROB_COLUMNS:
        slices[c] = rng.uniform(0.05, 0.4, len(uids))
    png = root / "report.png"
    mpimg.imsave(png, rng.uniform(0, 1, (40, 60, 3)))
    out: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        positive = apply_study_model(_model(0.2), slices)
        negative = apply_study_model(_model(0.9), slices)
        assert positive["flag"] == "positive" and negative["flag"] == "negative" and negative["subtypes_withheld"]
        pos = write_study_dicom(root / "positive", paths, slices, positive, IDENTITY, png)
        neg = write_study_dicom(root / "negative", paths, slices, negative, IDENTITY, png)
        verdict = {"assessable": False, "reasons": [{"code": "rescale_slope_zero", "message": "RescaleSlope is 0"}]}
        na = write_study_dicom(root / "na", paths, slices[["sop_uid"]], None, IDENTITY, png, assessment=verdict)
        out.update(sr_positive=pos.sr_path, sr_negative=neg.sr_path, sr_not_assessable=na.sr_path, sc=pos.sc_path)
        out["negative_result"] = negative

        refs = [{"path": str(p)} for p in paths]
        volume, meta = convert_series(refs, crop=48, spacing=None, correct_tilt=True)
        blood = (volume > 55) & (volume < 95)
        two = BleedMap(np.stack([blood, volume > 300], axis=-1), ["subdural", "intraparenchymal"], "seg_aux:m", [0])
        d = write_seg(root / "seg", refs, two, meta, None, IDENTITY)
        out["seg_subtypes"] = root / "seg" / d["seg"]
        mf_uid = f"{study}.5"
        n = enhanced_copy(
            paths, root / "mf" / "MF", sop_uid=f"{mf_uid}.1", series_uid=mf_uid, study_uid=study,
            patient_id="P77", reverse=True,
        )  # fmt: skip
        ds = pydicom.dcmread(root / "mf" / "MF")
        ds.FrameOfReferenceUID = f"{study}.99"
        ds.save_as(root / "mf" / "MF", enforce_file_format=True)
        mf_refs = [
            {"path": str(root / "mf" / "MF"), "frame": f, "sop_uid": frame_sop_uid(f"{mf_uid}.1", f)}
            for f in range(1, n + 1)
        ]
        volume2, meta2 = convert_series(mf_refs, crop=48, spacing=None, correct_tilt=True)
        cam = BleedMap(((volume2 > 55) & (volume2 < 95))[..., None], ["any"], "gradcam:m", [0])
        d2 = write_seg(root / "seg_mf", mf_refs, cam, meta2, None, IDENTITY)
        out["seg_gradcam_enhanced"] = root / "seg_mf" / d2["seg"]
        out["sr_enhanced"] = write_study_dicom(
            root / "mf_sr", mf_refs, slices.assign(sop_uid=[frame_sop_uid(f"{mf_uid}.1", f) for f in range(1, n + 1)]),
            positive, IDENTITY, png,
        ).sr_path  # fmt: skip
    out["src"] = paths
    out["mf"] = root / "mf" / "MF"
    return out
