"""Drift watch (rsna19/monitor): the bundle's reference from its training data, each study's input facts, PSI per
fact. The tiny run's own test studies raise no warning; a study set from another synthetic scanner profile does."""

from __future__ import annotations

import numpy as np
import pytest
from hospital import SOFT, THICK_MM, head_plan, write_series

from rsna19.monitor.drift import (
    PSI_WARNING,
    build_reference,
    drift_state,
    fact_reference,
    metrics_lines,
    node_drift_state,
    psi,
    study_record,
    worklist_banner,
)
from rsna19.monitor.facts import FACTS
from rsna19.study.batch import predict_studies
from rsna19.study.bundle import export_bundle, load_bundle
from rsna19.study.predictor import StudyOptions, StudyPredictor

#: Another scanner: another vendor and kernel, thinner slices, and a calibration 40 HU high.
OTHER_SCANNER = {"Manufacturer": "ACME Medical", "ConvolutionKernel": "FC68", "SliceThickness": 2.5}


def test_psi_is_near_zero_for_the_same_shares_and_large_for_a_shift():
    assert psi([0.25, 0.25, 0.25, 0.25], [5, 5, 5, 5]) == pytest.approx(0.0, abs=1e-12)
    assert psi([0.1, 0.4, 0.4, 0.1], [0, 0, 0, 20]) > 1.0
    # One odd study among few does not read as drift (smoothing).
    assert psi([0.1, 0.4, 0.4, 0.1], [1, 1, 0, 0]) < PSI_WARNING


def test_reference_bins_and_categories():
    ref = fact_reference("number", list(range(100)))
    assert ref["edges"] == pytest.approx([9.9, 49.5, 89.1]) and sum(ref["shares"]) == pytest.approx(1.0)
    cat = fact_reference("category", ["GE", "GE", "SIEMENS", None])
    assert cat["shares"] == {"GE": 0.5, "SIEMENS": 0.25, "unknown": 0.25, "other": 0.0}


def test_state_needs_enough_studies_and_feeds_metrics_and_worklist():
    rng = np.random.default_rng(0)
    facts = [{"manufacturer": "GE", "hu_brain_median": float(v)} for v in rng.normal(30, 2, 200)]
    ref = build_reference(facts, list(rng.uniform(0, 1, 100)), [True] * 20 + [False] * 80, "test")
    assert ref["flag_rate"] == 0.2
    same = [
        {"manufacturer": "GE", "hu_brain_median": float(v), "p_any": float(p), "flag": bool(p > 0.8)}
        for v, p in zip(rng.normal(30, 2, 30), rng.uniform(0, 1, 30))
    ]
    shifted = [{**s, "hu_brain_median": s["hu_brain_median"] + 40, "flag": True} for s in same]
    quiet, loud = drift_state(ref, same), drift_state(ref, shifted)
    assert not quiet["warning"] and loud["warning"] and loud["worst"] in ("hu_brain_median", "flag")
    assert loud["flag_rate"] == 1.0 and loud["reference_flag_rate"] == 0.2
    assert not drift_state(ref, shifted[:3])["warning"]  # too few studies to judge
    lines = metrics_lines(loud)
    assert "rsna19_drift_warning 1" in lines and any(line.startswith("rsna19_drift_psi{") for line in lines)
    assert worklist_banner(loud).startswith("⚠ input drift") and worklist_banner(quiet) is None
    assert drift_state(None, same)["message"].startswith("no drift reference")
    # The node's stored result (serve/worker.py study_summary) → a record.
    one = [{"drift_facts": {"manufacturer": "GE"}, "p_any": 0.1, "flag": False}]
    assert node_drift_state(ref, one)["n_studies"] == 1
    assert study_record({"drift_facts": {"kernel": "B"}, "p_any": 0.5, "flag": True}) == {
        "kernel": "B",
        "p_any": 0.5,
        "flag": True,
    }


def _records(summary):
    out = []
    for s in summary["studies"]:
        r = s.get("study_result") or {}
        any_ = (r.get("classes") or {}).get("any") or {}
        out.append({**(s.get("input_facts") or {}), "p_any": any_.get("probability"), "flag": any_.get("positive")})
    return out


@pytest.fixture(scope="module")
def drift(tiny_run, tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    path = export_bundle(tiny_run, root / "bundle").path
    bundle = load_bundle(path, device="cpu")
    predictor = StudyPredictor(bundle, StudyOptions(cam=False))
    own = predict_studies(tiny_dataset / "stage_2_test", predictor, root / "own", say=lambda _l: None).summary
    for i in range(4):
        uid = f"1.2.826.0.1.3680043.10.1226.50.{i + 1}"
        write_series(
            root / "other" / str(i), head_plan(seed=10 + i), study_uid=uid, series_uid=f"{uid}.1", step=THICK_MM,
            attrs={**SOFT, **OTHER_SCANNER, "SeriesDescription": "Head 2.5 FC68"}, add_hu=40.0,
        )  # fmt: skip
    other = predict_studies(root / "other", predictor, root / "other_out", say=lambda _l: None).summary
    return {"bundle": bundle, "own": own, "other": other}


def test_bundle_records_the_reference(drift):
    ref = drift["bundle"].drift_reference
    assert ref is not None and ref["n_series"] > 0 and set(ref["facts"]) <= set(FACTS)
    assert {"slice_thickness_mm", "pixel_spacing_mm", "hu_brain_median", "manufacturer"} <= set(ref["facts"])
    assert "p_any" in ref["outputs"] and 0.0 <= ref["flag_rate"] <= 1.0


def test_own_test_studies_raise_no_warning(drift):
    records = _records(drift["own"])
    assert records and all(r.get("hu_brain_median") is not None for r in records)
    state = drift_state(drift["bundle"].drift_reference, records, min_studies=len(records))
    assert not state["warning"], state


def test_other_scanner_profile_raises_the_warning(drift):
    records = _records(drift["other"])
    assert [r["manufacturer"] for r in records] == ["ACME Medical"] * 4
    state = drift_state(drift["bundle"].drift_reference, records, min_studies=len(records))
    assert state["warning"] and state["score"] > PSI_WARNING, state
    assert state["psi"]["manufacturer"] > PSI_WARNING and state["psi"]["kernel"] > PSI_WARNING
