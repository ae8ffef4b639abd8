"""Every kind of DICOM object rsna19 writes, checked by Debian's dciodvfy (dicom3tools) and DCMTK's dsrdump.

The objects are written by the same functions predict-study and the node use (rsna19/inference/dicom_out.py and
seg_out.py), from small synthetic head series written with pydicom (single-frame CT and Enhanced CT), without a
bundle, so this runs in seconds:

* SR of a positive study (``any`` and a subtype present), of a negative study whose subtypes are over their own
  operating points (withheld, with the comment), and of a not-assessable study (Indeterminate + reasons);
* SC of the report picture;
* SEG of a seg_aux-style map (one segment per subtype) and of a Grad-CAM map (one ``any`` segment), over
  single-frame sources and over the frames of an Enhanced CT file.

Each must give 0 errors under dciodvfy and no "Unrecognized" term warning (no private coding scheme); dsrdump must
read every SR. Without the tools the tests are skipped; ``make test-dicom`` installs them (tests/dicom/
ensure_tools.sh) and sets ``RSNA19_REQUIRE_DICOM_TOOLS=1``, under which a missing tool fails the test instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pydicom
import pytest
from hospital import SOFT, THICK_MM, enhanced_copy, head_plan, write_series

from rsna19.calibration import apply_study_model
from rsna19.constants import CLASSES, PROB_COLUMNS
from rsna19.conversion.series import convert_series
from rsna19.inference.dicom_out import FINDING_CODES, write_study_dicom
from rsna19.inference.seg_out import BleedMap, write_seg
from rsna19.io.multiframe import frame_sop_uid

STUDY = "1.2.826.0.1.3680043.10.1226.77"
IDENTITY = {"rsna19_version": "0.0-test", "bundle_sha256": "c0ffee" * 10 + "abcd", "bundle_version": 3}
REQUIRE = os.environ.get("RSNA19_REQUIRE_DICOM_TOOLS") == "1"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if REQUIRE:
            pytest.fail(f"{name} not installed (make test-dicom installs dicom3tools and dcmtk)")
        pytest.skip(f"{name} not installed (Debian packages dicom3tools / dcmtk; make test-dicom installs them)")
    return path


def _model(any_threshold: float) -> dict:
    return {
        "score": "max",
        "method": "platt",
        "classes": {
            c: {"a": 1.0, "b": 0.0, "threshold": any_threshold if c == "any" else 0.1, "target_sensitivity": 0.95}
            for c in CLASSES
        },
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every kind of object, written once: name → path."""
    root = tmp_path_factory.mktemp("conformance")
    paths = write_series(
        root / "src", head_plan(), study_uid=STUDY, series_uid=f"{STUDY}.1", step=THICK_MM,
        attrs={**SOFT, "SeriesDescription": "Head 5.0 H30s"},
    )  # fmt: skip
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.FrameOfReferenceUID = f"{STUDY}.99"
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
        mf_uid = f"{STUDY}.5"
        n = enhanced_copy(
            paths, root / "mf" / "MF", sop_uid=f"{mf_uid}.1", series_uid=mf_uid, study_uid=STUDY,
            patient_id="P77", reverse=True,
        )  # fmt: skip
        ds = pydicom.dcmread(root / "mf" / "MF")
        ds.FrameOfReferenceUID = f"{STUDY}.99"
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
    return out


OBJECTS = ("sr_positive", "sr_negative", "sr_not_assessable", "sr_enhanced", "sc", "seg_subtypes",
           "seg_gradcam_enhanced")  # fmt: skip


@pytest.mark.parametrize("name", OBJECTS)
def test_dciodvfy_finds_no_error_and_no_unrecognized_term(written, name):
    res = subprocess.run([_tool("dciodvfy"), str(written[name])], capture_output=True, text=True, timeout=120)
    lines = (res.stdout + res.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    unrecognized = [line for line in lines if "Unrecognized" in line]
    assert not errors, f"{name}: {errors}"
    assert not unrecognized, f"{name}: {unrecognized}"


@pytest.mark.parametrize("name", [o for o in OBJECTS if o.startswith("sr")])
def test_dsrdump_reads_every_sr_and_every_finding_is_snomed(written, name):
    res = subprocess.run([_tool("dsrdump"), "-Ec", str(written[name])], capture_output=True, text=True, timeout=120)
    text = res.stdout + res.stderr
    assert res.returncode == 0 and "error" not in text.lower(), text[-2000:]
    for value, _meaning in FINDING_CODES.values():
        assert f"({value},SCT," in text, value
    assert "99RSNA19" not in text


def test_negative_study_marks_no_subtype_present(written):
    """The bleed-free study's subtypes are over their own operating points, yet none is Present; each says why."""
    sr = pydicom.dcmread(written["sr_negative"])
    found = {}
    for group in sr.ContentSequence:
        if group.ValueType != "CONTAINER":
            continue
        for g in group.get("ContentSequence") or []:
            items = g.get("ContentSequence") or []
            finding = [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Finding"]
            if not finding:
                continue
            code = finding[0].ConceptCodeSequence[0].CodeValue
            evaluations = [i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == code]
            comments = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
            found[code] = (evaluations[0].ConceptCodeSequence[0].CodeMeaning, comments)
    assert {v for v, _ in found.values()} == {"Absent"} and len(found) == 6
    withheld = written["negative_result"]["subtypes_withheld"]
    for cls in withheld:
        assert any("not reported" in c for c in found[FINDING_CODES[cls][0]][1])
