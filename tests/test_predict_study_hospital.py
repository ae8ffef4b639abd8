"""``rsna19 predict-study`` on hospital-like studies: the series it picks and why, thin series reformatted to the
training spacing, and the speed controls (--folds, --tta, --device auto, per-series timings)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hospital import SOFT, THICK_MM, THIN_MM, head_plan, write_hospital_study, write_series

from rsna19.bundle import export_bundle
from rsna19.cli import main
from rsna19.constants import CLASSES

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")

#: Largest difference of a study-level probability between the 5 mm and the 0.625 mm series of one head.
STUDY_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def bundle(tiny_run, tmp_path_factory):
    return export_bundle(tiny_run, tmp_path_factory.mktemp("hospital_bundle") / "bundle").path


@pytest.fixture(scope="module")
def plan():
    return head_plan()


def _run(args):
    assert main(["predict-study", *map(str, args), "--no-cam"]) == 0


def test_bundle_records_the_training_slices(bundle):
    geo = json.loads((bundle / "bundle.json").read_text())["training_geometry"]
    # configs/pipelines/tiny.yaml on the tiny preset: table steps of 3–5 mm, 64-pixel slices of ~4 mm pixels.
    assert 3.0 <= geo["slice_spacing_mm"] <= 5.0 and geo["n_series"] > 0
    assert 3.0 <= geo["pixel_spacing_range_mm"][0] <= geo["pixel_spacing_mm"] <= geo["pixel_spacing_range_mm"][1]


def test_hospital_study_picks_the_intended_series_and_explains_every_choice(bundle, plan, tmp_path):
    uid = write_hospital_study(tmp_path / "in", plan)
    out = tmp_path / "out"
    _run([tmp_path / "in", "--bundle", bundle, "--out", out])
    summary = json.loads((out / "studies.json").read_text())
    assert summary["device"] == "cpu"  # --device auto on a machine without a GPU
    assert summary["training_slices"]["assumed"] is False
    (study,) = summary["studies"]
    assert study["status"] == "ok"
    assert [s["series_uid"] for s in study["series_used"]] == [uid["soft"]]
    reasons = {s["series_uid"]: s["reason"] for s in study["series_skipped"]}
    assert set(reasons) == {uid["bone"], uid["thin"], uid["scout"], uid["cta"]}
    assert reasons[uid["bone"]].startswith("bone kernel")
    assert reasons[uid["thin"]].startswith("thicker series preferred")
    assert reasons[uid["scout"]].startswith("localizer")
    assert reasons[uid["cta"]].startswith("contrast")
    assert [r["series_uid"] for r in study["series_ranking"]][0] == uid["soft"]
    assert set(study["result_series"]) == set(CLASSES) and set(study["result_series"].values()) == {uid["soft"]}
    used = study["series_used"][0]
    assert set(used["seconds"]) == {"convert_s", "reformat_s", "models_s", "stack_s"}
    assert used["reformat"] is None and used["selection"]["rank"] == 1
    slices = pd.read_csv(out / "slices.csv")
    assert set(slices["series_uid"]) == {uid["soft"]} and len(slices) == 8


def test_thin_series_is_reformatted_and_agrees_with_the_thick_one(bundle, plan, tmp_path):
    """One head written at 5 mm (study A) and at 0.625 mm (study B): every thin slice gets a probability, and the
    study results agree within STUDY_TOLERANCE; --folds / --tta cut the work down and are recorded."""
    write_series(
        tmp_path / "in" / "a",
        plan,
        study_uid="1.2.7",
        series_uid="1.2.7.1",
        step=THICK_MM,
        attrs={**SOFT, "SeriesDescription": "Head 5"},
    )
    write_series(
        tmp_path / "in" / "b",
        plan,
        study_uid="1.2.8",
        series_uid="1.2.8.1",
        step=THIN_MM,
        attrs={**SOFT, "SeriesDescription": "Head 0.6"},
    )
    out = tmp_path / "out"
    _run([tmp_path / "in", "--bundle", bundle, "--out", out, "--folds", "0", "--tta", "none", "--device", "cpu"])
    summary = json.loads((out / "studies.json").read_text())
    assert summary["folds"] == [0] and summary["tta"] == ["none"]
    by = {s["study_uid"]: s for s in summary["studies"]}
    thin = by["1.2.8"]["series_used"][0]
    n_slabs = thin["reformat"]["n_slabs"]
    assert thin["reformat"]["n_slices_in"] == 64 and 6 <= n_slabs <= 14
    assert abs(thin["reformat"]["slab_width_mm"] - summary["training_slices"]["slice_spacing_mm"]) < 1.0
    slices = pd.read_csv(out / "slices.csv")
    b = slices[slices["study_uid"] == "1.2.8"]
    assert len(b) == 64 and b["p_any"].nunique() <= n_slabs
    pa = by["1.2.7"]["prediction"]["max_probability"]
    pb = by["1.2.8"]["prediction"]["max_probability"]
    diff = max(abs(pa[c] - pb[c]) for c in CLASSES)
    assert diff <= STUDY_TOLERANCE, f"5 mm {pa} vs 0.625 mm {pb}"
    per_model = pd.read_csv(out / "models.csv")
    assert len(per_model[per_model["study_uid"] == "1.2.8"]) == 64 * per_model["model"].nunique()
    assert np.isfinite(b[[f"p_{c}" for c in CLASSES]].to_numpy()).all()


def test_bad_speed_controls_are_user_errors(bundle, tmp_path, capsys):
    write_series(tmp_path / "in", head_plan(), study_uid="1.2.9", series_uid="1.2.9.1", step=THICK_MM, attrs=SOFT)
    out = tmp_path / "out"
    assert (
        main(["predict-study", str(tmp_path / "in"), "--bundle", str(bundle), "--out", str(out), "--folds", "7"]) == 1
    )
    assert "not [7]" in capsys.readouterr().err
    assert main(["predict-study", str(tmp_path / "in"), "--bundle", str(bundle), "--out", str(out), "--tta", "x"]) == 1
    assert "unknown TTA 'x'" in capsys.readouterr().err
