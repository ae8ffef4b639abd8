"""The not-assessable gate (rsna19/inference/assess.py): each case of issue 26 point 6 sent next to a normal study
through one predict-study run with --dicom-out, on the tiny run's bundle; and the gate alone on small arrays."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pydicom
import pytest
from hospital import SOFT, STUDY, THICK_MM, head_plan, write_series

from rsna19.cli import main
from rsna19.inference.assess import GateLimits, assess_series, head_slices
from rsna19.io.dicom_write import SliceGeometry, write_ct_dicom
from rsna19.study.bundle import export_bundle

ROOT = "1.2.826.0.1.3680043.10.1226.26"
CASES = ("normal", "slope_zero", "uniform", "no_head", "coverage", "few")


def _set(path, **attrs):
    ds = pydicom.dcmread(path)
    for k, v in attrs.items():
        setattr(ds, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds.save_as(path, enforce_file_format=True)


def _flat_series(folder, study_uid, hu_of, n=8):
    """``n`` axial 64² slices 5 mm apart whose HU come from ``hu_of(k)`` (no head phantom)."""
    folder.mkdir(parents=True)
    series = f"{study_uid}.1"
    for k in range(n):
        path = folder / f"IM{k:04d}"
        geometry = SliceGeometry((-128.0, -128.0, 5.0 * k), (1, 0, 0, 0, 1, 0), (4.0, 4.0), 5.0)
        write_ct_dicom(
            path, hu_of(k), geometry, sop_uid=f"{series}.{k + 1}", series_uid=series, study_uid=study_uid,
            patient_id="P26", instance_number=k + 1,
        )  # fmt: skip
        _set(path, **STUDY, **SOFT)


def write_cases(root):
    """One study a case under ``root/<case>``; returns case → StudyInstanceUID."""
    plan = head_plan()
    uids = {case: f"{ROOT}.{i + 1}" for i, case in enumerate(CASES)}

    def head(case):
        attrs = {**SOFT, "SeriesDescription": "Head 5.0 H30s"}
        return write_series(
            root / case, plan, study_uid=uids[case], series_uid=f"{uids[case]}.1", step=THICK_MM, attrs=attrs
        )

    head("normal")
    # The case: one slice whose RescaleSlope is 0 (a flat image, invalid DICOM).
    first, *rest = head("slope_zero")
    _set(first, RescaleSlope=0)
    for p in rest:
        p.unlink()
    rng = np.random.default_rng(0)
    _flat_series(root / "uniform", uids["uniform"], lambda k: np.full((64, 64), 30.0))
    _flat_series(root / "no_head", uids["no_head"], lambda k: rng.normal(-1000.0, 15.0, (64, 64)))
    # Five head slices squeezed into 1 mm apart: 5 mm of head, far short of the training series.
    for k, p in enumerate(sorted(head("coverage"))):
        if k >= 5:
            p.unlink()
            continue
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        ipp = [float(v) for v in ds.ImagePositionPatient]
        _set(p, ImagePositionPatient=[ipp[0], ipp[1], 100.0 + k], SliceThickness=1.0)
    for k, p in enumerate(sorted(head("few"))):  # 3 slices: fewer than the 5-slice 2.5D model reads
        if k >= 3:
            p.unlink()
    return uids


@pytest.fixture(scope="module")
def gated(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("not_assessable")
    bundle = export_bundle(tiny_run, root / "bundle").path
    uids = write_cases(root / "in")
    out = root / "out"
    args = ["predict-study", str(root / "in"), "--bundle", str(bundle), "--out", str(out), "--no-cam"]
    assert main([*args, "--dicom-out", str(out / "dicom")]) == 0
    alone = root / "alone"
    assert (
        main(["predict-study", str(root / "in" / "normal"), "--bundle", str(bundle), "--out", str(alone), "--no-cam"])
        == 0
    )
    summary = json.loads((out / "studies.json").read_text())
    by_uid = {s["study_uid"]: s for s in summary["studies"]}
    return {
        "out": out,
        "summary": summary,
        "case": {case: by_uid[uid] for case, uid in uids.items()},
        "alone": json.loads((alone / "studies.json").read_text())["studies"][0],
        "bundle": bundle,
        "in": root / "in",
    }


EXPECTED = {
    "slope_zero": "rescale_slope_zero",
    "uniform": "uniform",
    "no_head": "no_head",
    "coverage": "coverage",
    "few": "too_few_slices",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_each_case_is_answered_not_assessable_with_its_reason(gated, case):
    s = gated["case"][case]
    assert s["status"] == "not_assessable", s.get("error")
    codes = [r["code"] for r in s["assessment"]["reasons"]]
    assert EXPECTED[case] in codes
    assert s["study_result"] is None and "prediction" not in s  # never a negative
    assert s["not_assessable"] and (gated["out"] / s["report"]).is_file()
    sr = pydicom.dcmread(gated["out"] / "dicom" / s["dicom"]["sr"])
    values, comments = _evaluations(sr.ContentSequence)
    assert values and set(values) == {"Indeterminate"}, values
    assert any(EXPECTED_TEXT[case] in c for c in comments), comments


EXPECTED_TEXT = {
    "slope_zero": "RescaleSlope is 0",
    "uniform": "blank or uniform",
    "no_head": "no head in the field of view",
    "coverage": "far short of the training",
    "few": "neighbouring slices",
}


def _evaluations(seq):
    """Qualitative evaluation values and comment texts of an SR content tree."""
    values, comments = [], []
    for item in seq or []:
        name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
        if item.ValueType == "CODE" and name != "Finding" and "ConceptCodeSequence" in item:
            meaning = item.ConceptCodeSequence[0].CodeMeaning
            if meaning in ("Present", "Absent", "Indeterminate"):
                values.append(meaning)
        if item.ValueType == "TEXT" and name == "Comment":
            comments.append(str(item.TextValue))
        v, c = _evaluations(item.get("ContentSequence"))
        values += v
        comments += c
    return values, comments


def test_normal_study_is_answered_as_before(gated):
    s, alone = gated["case"]["normal"], gated["alone"]
    assert s["status"] == "ok" and s["assessment"]["assessable"]
    assert s["study_result"]["classes"] == alone["study_result"]["classes"]
    assert gated["summary"]["n_not_assessable"] == len(EXPECTED) and gated["summary"]["n_ok"] == 1


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_not_assessable_sr_validates(gated):
    import subprocess

    for case in EXPECTED:
        path = gated["out"] / "dicom" / gated["case"][case]["dicom"]["sr"]
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{case}: {errors}"


def test_validate_counts_not_assessable_studies_apart(gated, tmp_path):
    """validate runs predict-study, so the same gate: a refused study is 'not_assessable', never scored."""
    from rsna19.validation.references import Reference
    from rsna19.validation.run import study_table

    summary = gated["summary"]
    slices = pd.read_csv(gated["out"] / "slices.csv")
    model = json.loads((gated["bundle"] / "study_model.json").read_text())
    keys = [s["study_uid"] for s in summary["studies"]]
    labels = pd.DataFrame(0.0, index=pd.Index(keys, name="study_key"), columns=list(_classes()))
    table = study_table(summary, slices, model, Reference(labels=labels, classes=list(_classes())), "rsna")
    for case in EXPECTED:
        uid = gated["case"][case]["study_uid"]
        assert table.at[uid, "status"] == "not_assessable" and table.at[uid, "reason"]
        assert np.isnan(table.at[uid, "p_any"])
    assert table.at[gated["case"]["normal"]["study_uid"], "status"] == "ok"


def _classes():
    from rsna19.core.constants import CLASSES

    return CLASSES


def test_gate_on_arrays():
    """The gate alone: a phantom head passes; air, a flat image, too few slices and short coverage do not."""
    from rsna19.synth.phantom import render

    plan = head_plan()
    from rsna19.synth.cq500 import series_geometry

    geom = series_geometry(plan, THICK_MM)
    vol = np.stack([render(plan.head, plan.bleeds, geom.pixel_points(k))[0] for k in range(geom.n_slices)])
    meta = {"positions": [5.0 * k for k in range(len(vol))], "spacing": [5.0, 4.0, 4.0]}
    limits = GateLimits(min_slices=5, training_z_extent_mm=40.0)
    assert head_slices(vol).all()
    ok = assess_series(vol, meta, limits)
    assert ok["assessable"] and ok["checks"]["head_extent_mm"] == pytest.approx(5.0 * len(vol))
    air = assess_series(np.full_like(vol, -1000.0) + np.random.default_rng(1).normal(0, 5, vol.shape), meta, limits)
    assert [r["code"] for r in air["reasons"]] == ["no_head"]
    flat = assess_series(np.zeros_like(vol), meta, limits)
    assert [r["code"] for r in flat["reasons"]] == ["uniform"]
    short = assess_series(vol[:3], {**meta, "positions": meta["positions"][:3]}, limits)
    assert [r["code"] for r in short["reasons"]] == ["too_few_slices"]
    squeezed = assess_series(vol[:5], {"positions": [0, 1, 2, 3, 4], "spacing": [1.0, 4.0, 4.0]}, limits)
    assert [r["code"] for r in squeezed["reasons"]] == ["coverage"]


def test_node_record_says_not_assessable_never_negative(gated):
    """The node stores predict-study's entry as its worklist record (serve/worker.py study_summary)."""
    from rsna19.serve.worker import study_summary

    out = gated["out"] / "results" / "x"
    record = study_summary(gated["case"]["slope_zero"], out)
    assert record["assessable"] is False and "RescaleSlope is 0" in record["not_assessable"]
    assert record["p_any"] is None and record["flag"] is None and record["positive_classes"] == []
    assert record["sr"] and record["report"]
    normal = study_summary(gated["case"]["normal"], out)
    assert normal["assessable"] is True and normal["p_any"] is not None
    assert normal["drift_facts"]["hu_brain_median"] is not None  # the drift watch's facts travel with the record


def test_predictor_in_memory_marks_the_study_not_assessable(gated):
    """The gate runs inside StudyPredictor.predict: a refused study comes back marked, with reasons, no model run."""
    from rsna19.study.predictor import StudyOptions, StudyPredictor

    predictor = StudyPredictor.load(gated["bundle"], device="cpu", options=StudyOptions(cam=False))
    result = predictor.predict(gated["in"] / "uniform")
    assert result.error is None and not result.assessable and not result.ok
    assert "uniform" in [r["code"] for r in result.assessment["reasons"]]
    assert result.series == [] and result.study_result is None and result.prediction is None
    assert result.refused is not None and result.refused[0].shape[0] == 8  # the refused (Z, H, W) HU volume
    entry = result.entry()
    assert entry["status"] == "not_assessable" and entry["not_assessable"] == result.not_assessable
    assert entry["assessment"]["assessable"] is False and "prediction" not in entry
    normal = predictor.predict(gated["in"] / "normal")
    assert normal.ok and normal.assessable and normal.assessment["assessable"]
    assert normal.input_facts is not None and normal.input_facts["hu_brain_median"] is not None
