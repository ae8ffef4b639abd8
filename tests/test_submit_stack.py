"""``rsna19 submit``: the Kaggle csv from a finished stack is complete, valid and in the sample's order."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from predfactory import make_work_dir

from rsna19.cli import main
from rsna19.core.config import load_config
from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.stacking.config import StackConfig
from rsna19.stacking.run import run_stack
from rsna19.stacking.submit import write_stack_submission

TINY = Path(__file__).resolve().parents[1] / "configs" / "stack" / "tiny.yaml"


@pytest.fixture(scope="module")
def stacked(tmp_path_factory):
    work = make_work_dir(tmp_path_factory.mktemp("submit") / "work", n_patients=15, n_test_patients=4)
    overrides = [f"runs={work.runs}", f"folds_csv={work.folds_csv}", f"out={work.root / 'stack'}"]
    cfg = load_config(StackConfig, TINY, [*overrides, "lgbm.enabled=false", "mlp.enabled=false"])
    return work, run_stack(cfg).out_dir


def test_submission_matches_sample(stacked, tmp_path):
    work, stack_dir = stacked
    out = write_stack_submission(stack_dir, tmp_path / "sub.csv", "blend", work.sample_submission)
    sub = pd.read_csv(out)
    sample = pd.read_csv(work.sample_submission)
    assert list(sub.columns) == ["ID", "Label"]
    assert sorted(sub["ID"]) == sorted(sample["ID"])
    # Slices come in the sample's order, six rows a slice.
    order = pd.unique(sample["ID"].str.rsplit("_", n=1).str[0])
    assert pd.unique(sub["ID"].str.rsplit("_", n=1).str[0]).tolist() == list(order)
    assert sub["Label"].between(0, 1).all()
    # The labels are the blend's test probabilities.
    test = pd.read_parquet(stack_dir / "test.parquet")
    blend = test[test["model"] == "blend"].set_index("sop_uid")
    row = sub.iloc[0]
    sop, cls = row["ID"].rsplit("_", 1)
    assert row["Label"] == pytest.approx(blend.loc[sop, f"p_{cls}"], rel=1e-7)  # written with 8 digits


def test_cli_submit_without_sample(stacked, tmp_path, capsys):
    _, stack_dir = stacked
    assert main(["submit", str(stack_dir), "--out", str(tmp_path / "s.csv"), "--which", "convex"]) == 0
    sub = pd.read_csv(tmp_path / "s.csv")
    assert len(sub) % len(CLASSES) == 0
    assert "convex predictions written" in capsys.readouterr().out
    assert main(["submit", str(stack_dir), "--out", str(tmp_path / "s.csv"), "--which", "lgbm"]) == 1
    assert "available: blend, convex, mean" in capsys.readouterr().err


def test_sample_mismatch_is_an_error(stacked, tmp_path):
    work, stack_dir = stacked
    sample = pd.read_csv(work.sample_submission)
    short = sample[~sample["ID"].str.startswith(sample["ID"].iloc[0].rsplit("_", 1)[0])]
    short.to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(UserError, match="not expected"):
        write_stack_submission(stack_dir, tmp_path / "sub.csv", "blend", tmp_path / "short.csv")
    extra = pd.concat([sample, pd.DataFrame({"ID": [f"ID_0000000ff_{c}" for c in CLASSES], "Label": 0.5})])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    with pytest.raises(UserError, match="1 expected slices are missing"):
        write_stack_submission(stack_dir, tmp_path / "sub.csv", "blend", tmp_path / "extra.csv")
    assert not (tmp_path / "sub.csv").exists()


def test_missing_stack_dir(tmp_path):
    with pytest.raises(UserError, match="run `rsna19 stack` first"):
        write_stack_submission(tmp_path, tmp_path / "s.csv")
