"""``rsna19 predict-study`` on an Enhanced CT (multi-frame) study: every frame is predicted like the same slice
stored as a single-frame file, and the DICOM SR references frames as (file SOP instance, ReferencedFrameNumber)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from hospital import SOFT, THICK_MM, enhanced_copy, head_plan, write_series
from pydicom.multival import MultiValue

from rsna19.cli import main
from rsna19.core.constants import CLASSES
from rsna19.study.bundle import export_bundle

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

STUDY_SINGLE, STUDY_MULTI = "1.2.826.0.1.3680043.10.1226.710", "1.2.826.0.1.3680043.10.1226.720"
MULTI_SERIES = f"{STUDY_MULTI}.1"
MULTI_SOP = f"{MULTI_SERIES}.1"
PROB = [f"p_{c}" for c in CLASSES]


def _enhanced_copy(files: list[Path], path: Path) -> int:
    """The single-frame ``files`` as one Enhanced CT file (frames in reverse spatial order); returns the frames."""
    return enhanced_copy(
        files, path, sop_uid=MULTI_SOP, series_uid=MULTI_SERIES, study_uid=STUDY_MULTI, patient_id="P1", reverse=True
    )


@pytest.fixture(scope="module")
def served(tiny_run, tmp_path_factory):
    """One synthetic 5 mm series stored as single-frame files (study A) and as one Enhanced CT file (study B),
    through predict-study with --dicom-out."""
    root = tmp_path_factory.mktemp("multiframe")
    bundle = export_bundle(tiny_run, root / "bundle").path
    files = write_series(
        root / "in" / "single",
        head_plan(),
        study_uid=STUDY_SINGLE,
        series_uid=f"{STUDY_SINGLE}.1",
        step=THICK_MM,
        attrs={**SOFT, "SeriesDescription": "Head 5.0 H30s"},
    )
    n = _enhanced_copy(files, root / "in" / "multi" / "enhanced.dcm")
    out = root / "out"
    args = ["predict-study", root / "in", "--bundle", bundle, "--out", out, "--no-cam", "--dicom-out", out / "dicom"]
    assert main([str(a) for a in args]) == 0
    summary = json.loads((out / "studies.json").read_text())
    return {"out": out, "summary": summary, "n": n, "by": {s["study_uid"]: s for s in summary["studies"]}}


def test_every_frame_gets_the_single_frame_probabilities(served):
    by = served["by"]
    assert by[STUDY_MULTI]["status"] == "ok" and by[STUDY_SINGLE]["status"] == "ok"
    assert by[STUDY_MULTI]["series_used"][0]["n_files"] == 1
    slices = pd.read_csv(served["out"] / "slices.csv")
    single = slices[slices["study_uid"] == STUDY_SINGLE].sort_values("position").reset_index(drop=True)
    multi = slices[slices["study_uid"] == STUDY_MULTI].sort_values("position").reset_index(drop=True)
    n = served["n"]
    assert len(single) == len(multi) == n
    # Frames were written in reverse spatial order: the lowest slice is the last frame.
    assert list(multi["sop_uid"]) == [f"{MULTI_SOP}.f{f}" for f in range(n, 0, -1)]
    np.testing.assert_allclose(multi["position"], single["position"])
    np.testing.assert_allclose(multi[PROB].to_numpy(), single[PROB].to_numpy(), rtol=0, atol=1e-6)
    pa, pb = (by[s]["prediction"]["max_probability"] for s in (STUDY_SINGLE, STUDY_MULTI))
    assert all(abs(pa[c] - pb[c]) <= 1e-6 for c in CLASSES)


def _image_refs(seq):
    """Every IMAGE content item of an SR, depth first: (ReferencedSOPInstanceUID, ReferencedFrameNumber list)."""
    for item in seq or []:
        if item.ValueType == "IMAGE":
            ref = item.ReferencedSOPSequence[0]
            frames = ref.get("ReferencedFrameNumber")
            frames = (
                [] if frames is None else [int(f) for f in (frames if isinstance(frames, MultiValue) else [frames])]
            )
            yield str(ref.ReferencedSOPInstanceUID), frames
        yield from _image_refs(item.get("ContentSequence"))


def test_sr_references_frames_of_the_enhanced_ct_file(served):
    entry = served["by"][STUDY_MULTI]
    sr = pydicom.dcmread(served["out"] / "dicom" / entry["dicom"]["sr"])
    assert sr.StudyInstanceUID == STUDY_MULTI and entry["dicom"]["evidence_instances"] == 1
    (ev,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = ev.ReferencedSeriesSequence
    assert [str(r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence] == [MULTI_SOP]
    refs = list(_image_refs(sr.ContentSequence))
    assert refs and {uid for uid, _ in refs} == {MULTI_SOP}  # the file's SOP instance, never "<uid>.f<n>"
    # Each class's source images are the frames of its highest slices.
    slices = pd.read_csv(served["out"] / "slices.csv")
    multi = slices[slices["study_uid"] == STUDY_MULTI]
    want = set()
    for c in CLASSES:
        top = multi.sort_values(f"p_{c}", ascending=False, kind="stable")["sop_uid"].head(3)
        want.add(tuple(sorted(int(u.rsplit(".f", 1)[1]) for u in top)))
    assert {tuple(frames) for _, frames in refs} == want
    assert all(1 <= f <= served["n"] for _, frames in refs for f in frames)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_sr_of_the_enhanced_ct_study_validates(served):
    entry = served["by"][STUDY_MULTI]
    for key in ("sr", "sc"):
        path = served["out"] / "dicom" / entry["dicom"][key]
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{key}: {errors}"
