"""The stack stage end to end on fake base-model predictions: honesty of level-2 CV, outputs, scores, restart."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from predfactory import make_work_dir

from rsna19.cli import main
from rsna19.core.config import load_config
from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.stacking.config import StackConfig
from rsna19.stacking.cv import cross_fit
from rsna19.stacking.features import Level2Data
from rsna19.stacking.inputs import KEY_COLUMNS
from rsna19.stacking.report import SCORE_COLUMNS, format_score_table
from rsna19.stacking.run import run_stack, write_features

TINY = Path(__file__).resolve().parents[1] / "configs" / "stack" / "tiny.yaml"


def _cfg(work, out: Path, *overrides: str) -> StackConfig:
    paths = [f"runs={work.runs}", f"folds_csv={work.folds_csv}", f"out={out}", f"models=[{','.join(work.models)}]"]
    return load_config(StackConfig, TINY, [*paths, *overrides])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work_dir(tmp_path_factory.mktemp("stack") / "work", n_patients=40, n_test_patients=8)


@pytest.fixture(scope="module")
def result(work):
    cfg = _cfg(work, work.root / "stack", f"test_labels={work.test_labels}")
    return run_stack(cfg)


def test_scores_table(result, work):
    scores = pd.read_csv(result.out_dir / "scores.csv")
    assert list(scores.columns) == SCORE_COLUMNS
    assert scores["name"].tolist() == [*work.models, "mean", "convex", "lgbm", "mlp", "blend"]
    assert scores["kind"].tolist() == ["base"] * 3 + ["mean", "stacker", "stacker", "stacker", "blend"]
    assert scores[["wll_oof", "wll_test", "auc_any"]].notna().all().all()
    wll = scores.set_index("name")["wll_oof"]
    # The neighbour features carry real information in the fake predictions: stacking must beat the base models.
    assert wll["blend"] < wll[work.models].min()
    assert wll["blend"] < wll["mean"]
    assert wll["lgbm"] < wll[work.models].min()
    text = format_score_table(scores)
    assert "blend *" in text or "lgbm *" in text
    assert len(text.splitlines()) == len(scores) + 2


def test_prediction_files(result, work):
    methods = ["mean", "convex", "lgbm", "mlp", "blend"]
    oof = pd.read_parquet(result.out_dir / "oof.parquet")
    test = pd.read_parquet(result.out_dir / "test.parquet")
    assert list(oof.columns) == [*KEY_COLUMNS, "fold", "model", *PROB_COLUMNS, *CLASSES]
    assert list(test.columns) == [*KEY_COLUMNS, "fold", "model", *PROB_COLUMNS]
    assert sorted(oof["model"].unique()) == sorted(methods)
    assert len(oof) == len(work.train) * len(methods) and len(test) == len(work.test) * len(methods)
    for df in (oof, test):
        p = df[list(PROB_COLUMNS)].to_numpy()
        assert np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()
    # Post-processing: each output's kept steps (weights.json, scores.csv) hold on its rows.
    kept = json.loads((result.out_dir / "weights.json").read_text())["postprocess"]
    assert sorted(kept) == ["blend", "convex", "lgbm", "mlp"]
    scores = pd.read_csv(result.out_dir / "scores.csv").set_index("name")
    for method, steps in kept.items():
        p = oof[oof["model"] == method][list(PROB_COLUMNS)].to_numpy()
        label = "+".join(s for s in ("any_ge_max", "clip") if steps[s]) or "none"
        assert scores.loc[method, "postprocess"] == label
        if steps["any_ge_max"]:
            assert (p[:, 5] >= p[:, :5].max(axis=1) - 1e-12).all()
        if steps["clip"]:
            assert p.min() >= steps["clip"] and p.max() <= 1 - steps["clip"]
    # OOF labels and folds are those of the base models.
    truth = work.train.set_index("sop_uid")
    blend = oof[oof["model"] == "blend"].set_index("sop_uid")
    assert (blend["fold"] == truth.loc[blend.index, "fold"]).all()
    assert (blend[list(CLASSES)] == truth.loc[blend.index, list(CLASSES)]).all().all()
    for name in ("weights.json", "timings.json", "config.yaml"):
        assert (result.out_dir / name).is_file()


def test_level2_oof_is_out_of_fold(result):
    l2 = result.level2
    for name, res in result.stackers.items():
        for k, trained_on in res.train_patients.items():
            held_out = np.unique(l2.oof.groups[l2.folds == k])
            assert len(np.intersect1d(trained_on, held_out)) == 0, name
            assert len(trained_on) + len(held_out) == len(np.unique(l2.oof.groups))


class _PatientMemory:
    """A stacker that memorises each training patient's mean label and answers 0.5 for strangers."""

    name = "memory"

    def fit(self, data: Level2Data, y: np.ndarray) -> None:
        self.table = pd.DataFrame(y).groupby(data.groups).mean()

    def predict(self, data: Level2Data) -> np.ndarray:
        return self.table.reindex(data.groups).fillna(0.5).to_numpy()


class _Squared:
    """A non-linear stacker that learns nothing: the squared mean of the base probabilities."""

    name = "squared"

    def fit(self, data: Level2Data, y: np.ndarray) -> None:
        pass

    def predict(self, data: Level2Data) -> np.ndarray:
        return data.base.astype(np.float64).mean(axis=1) ** 2


def test_memorising_stacker_learns_nothing_out_of_fold(result):
    l2 = result.level2
    res = cross_fit(_PatientMemory, l2.oof, l2.y, l2.folds, l2.test)
    # Every OOF row was predicted by a model that never saw its patient.
    assert np.all(res.oof == 0.5)
    assert np.all(res.test == 0.5)


def test_test_rows_are_stacked_per_base_fold(result, work, tmp_path):
    """Each level-2 fold model predicts the features of every base fold's test predictions; the mean is the test
    prediction. The features of one fold have the spread of the OOF rows the stackers were fitted on."""
    l2 = result.level2
    assert len(l2.test_folds) == len(set(l2.folds)) and l2.test_sets == l2.test_folds
    for k, d in enumerate(l2.test_folds):  # each set holds that fold model's own test predictions
        want = pd.read_parquet(work.runs / work.models[0] / f"fold_{k}" / "test.parquet").set_index("sop_uid")
        got = want.loc[l2.test_features["sop_uid"], list(PROB_COLUMNS)].to_numpy()
        np.testing.assert_allclose(d.base[:, 0], got, rtol=1e-6)
    np.testing.assert_allclose(np.mean([d.base for d in l2.test_folds], axis=0), l2.test.base, atol=1e-6)
    res = cross_fit(_Squared, l2.oof, l2.y, l2.folds, l2.test_sets)
    manual = np.mean([d.base.astype(np.float64).mean(axis=1) ** 2 for d in l2.test_folds], axis=0)
    np.testing.assert_allclose(res.test, manual)
    assert not np.allclose(res.test, l2.test.base.astype(np.float64).mean(axis=1) ** 2)  # not the averaged features
    # Averaged features instead: the convex blend is linear in the base probabilities, so it gives the same test
    # predictions; LightGBM's trees do not.
    averaged = run_stack(_cfg(work, tmp_path, f"test_labels={work.test_labels}", "features.test_per_fold=false"))
    assert averaged.level2.test_folds == []
    np.testing.assert_allclose(averaged.test["convex"], result.test["convex"], atol=1e-6)
    assert not np.allclose(averaged.test["lgbm"], result.test["lgbm"], atol=1e-6)


def test_restart_skips_and_force_recomputes(result, work):
    cfg = _cfg(work, work.root / "stack", f"test_labels={work.test_labels}")
    stamp = (result.out_dir / "oof.parquet").stat().st_mtime_ns
    again = run_stack(cfg)
    assert again.skipped
    assert (result.out_dir / "oof.parquet").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again.scores, pd.read_csv(result.out_dir / "scores.csv"))
    forced = run_stack(_cfg(work, work.root / "stack", "lgbm.enabled=false", "mlp.enabled=false"), force=True)
    assert not forced.skipped
    assert forced.scores["name"].tolist() == [*work.models, "mean", "convex", "blend"]
    assert not list(result.out_dir.parent.glob(".*tmp*"))


def test_without_test_labels_wll_test_is_empty(work, tmp_path):
    cfg = _cfg(work, tmp_path, "lgbm.enabled=false", "mlp.enabled=false", "blend.enabled=false")
    res = run_stack(cfg)
    assert res.scores["wll_test"].isna().all()
    lines = (res.out_dir / "scores.csv").read_text().splitlines()
    assert lines[1].split(",")[3] == ""  # an empty cell, not "nan"
    assert res.scores["name"].tolist() == [*work.models, "mean", "convex"]


def test_unknown_blend_member(work, tmp_path):
    cfg = _cfg(work, tmp_path, "lgbm.enabled=false", "mlp.enabled=false", "blend.members=[lgbm]")
    with pytest.raises(UserError, match=r"blend.members names stacker\(s\) \['lgbm'\]"):
        run_stack(cfg)


def test_cli_stack(work, tmp_path, capsys):
    argv = ["stack", str(TINY), "lgbm.enabled=false", "mlp.enabled=false", "--runs", str(work.runs)]
    argv += ["--folds", str(work.folds_csv), "--out", str(tmp_path), "--test-labels", str(work.test_labels)]
    argv += ["blend.per_class=false"]  # an override after the options still counts
    assert main(argv) == 0
    assert "per_class: false" in (tmp_path / "tiny" / "config.yaml").read_text().split("blend:")[1]
    out = capsys.readouterr().out
    assert "wll_oof" in out and "blend" in out
    assert (tmp_path / "tiny" / "scores.csv").is_file()
    assert main(argv) == 0
    assert "is complete" in capsys.readouterr().out
    assert main(["stack", str(TINY), "--runs", str(tmp_path / "nowhere")]) == 1


def test_timings_recorded(result):
    assert result.timings["lgbm_cv_s"] > 0 and not math.isnan(result.timings["features_s"])


def test_write_features(work, tmp_path):
    out = write_features(_cfg(work, tmp_path))
    assert out == tmp_path / "tiny-features"
    oof = pd.read_parquet(out / "features_oof.parquet")
    test = pd.read_parquet(out / "features_test.parquet")
    assert list(oof.columns[:12]) == [*KEY_COLUMNS, "fold", *CLASSES]
    assert len(oof) == len(work.train) and len(test) == len(work.test)
    assert list(test.columns[len(KEY_COLUMNS) :]) == list(oof.columns[len(KEY_COLUMNS) + 7 :])
