"""The stack split into jobs (features, one fit per stacker × fold, a final blend) gives the single job's files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from predfactory import make_work_dir

from rsna19.cli import main
from rsna19.core.config import load_config
from rsna19.stacking.config import StackConfig
from rsna19.stacking.parts import fit_jobs, fit_path, fits_current, level2_dir, load_level2, run_features
from rsna19.stacking.run import run_stack

TINY = Path(__file__).resolve().parents[1] / "configs" / "stack" / "tiny.yaml"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work_dir(tmp_path_factory.mktemp("split") / "work", n_patients=24, n_test_patients=4, n_folds=3)


def _args(work, out: Path) -> list[str]:
    argv = [str(TINY), "--runs", str(work.runs), "--folds", str(work.folds_csv), "--out", str(out)]
    return [
        *argv,
        "--test-labels",
        str(work.test_labels),
        "mlp.epochs=3",
        "lgbm.num_boost_round=30",
        "lgbm.inner_folds=1",
    ]


def _cfg(work, out: Path) -> StackConfig:
    paths = [f"runs={work.runs}", f"folds_csv={work.folds_csv}", f"out={out}", f"test_labels={work.test_labels}"]
    return load_config(StackConfig, TINY, [*paths, "mlp.epochs=3", "lgbm.num_boost_round=30", "lgbm.inner_folds=1"])


def test_split_stack_is_identical_to_the_single_job(work, tmp_path, capsys):
    single = run_stack(_cfg(work, tmp_path / "single"))
    split_out = tmp_path / "split"
    assert main(["stack", *_args(work, split_out), "--part", "features"]) == 0
    cfg = _cfg(work, split_out)
    jobs = fit_jobs(cfg, 3)
    assert jobs == [(s, k) for s in ("convex", "lgbm", "mlp") for k in range(3)]
    for stacker, fold in reversed(jobs):  # any order: each job reads only the features
        assert main(["stack", *_args(work, split_out), "--part", "fit", "--stacker", stacker, "--fold", str(fold)]) == 0
        assert fits_current(cfg, stacker, fold)
    assert main(["stack", *_args(work, split_out), "--part", "finish"]) == 0
    assert "blend" in capsys.readouterr().out
    a, b = single.out_dir, split_out / "tiny"
    for name in ("oof.parquet", "test.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / name), pd.read_parquet(b / name), check_exact=True)
    pd.testing.assert_frame_equal(pd.read_csv(a / "scores.csv"), pd.read_csv(b / "scores.csv"), check_exact=True)
    assert json.loads((a / "weights.json").read_text()) == json.loads((b / "weights.json").read_text())
    assert (a / "config.yaml").read_text().replace(str(a.parent), "OUT") == (b / "config.yaml").read_text().replace(
        str(b.parent), "OUT"
    )
    # The features were saved once and are read memory-mapped by every fit job.
    l2 = load_level2(level2_dir(cfg))
    assert isinstance(l2.oof.X, np.memmap) and l2.oof.X.shape == single.level2.oof.X.shape
    np.testing.assert_array_equal(np.asarray(l2.oof.X), single.level2.oof.X)


def test_split_parts_refuse_missing_inputs_and_go_stale(work, tmp_path, capsys):
    out = tmp_path / "s"

    def fails(*extra: str) -> str:
        assert main(["stack", *_args(work, out), *extra]) == 1
        return capsys.readouterr().err

    assert "--part features" in fails("--part", "fit", "--stacker", "lgbm", "--fold", "0")
    assert "needs --stacker NAME and --fold K" in fails("--part", "fit")
    cfg = _cfg(work, out)
    run_features(cfg)
    assert "not enabled" in fails("--part", "fit", "--stacker", "nope", "--fold", "0")
    assert "fold 7 is not a level-2 fold" in fails("--part", "fit", "--stacker", "convex", "--fold", "7")
    assert main(["stack", *_args(work, out), "--part", "fit", "--stacker", "convex", "--fold", "0"]) == 0
    assert fit_path(cfg, "convex", 0).is_file() and fits_current(cfg, "convex", 0)
    assert "fold_1.npz: missing" in fails("--part", "finish")
    run_features(cfg)  # new features (e.g. a base model re-predicted): the old fit is stale
    assert not fits_current(cfg, "convex", 0)
    assert not list(out.glob(".*tmp*")) and not list((out / "tiny-parts").rglob(".*tmp*"))
