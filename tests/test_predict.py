"""Prediction: parquet schema, TTA, and OOF files of all folds covering every training slice once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cachefactory import write_cache_and_folds

from rsna19.cli import main
from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.engine.runtime import TTA, parse_tta

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
N_FOLDS = 3
KEYS = ["sop_uid", "series_uid", "study_uid", "patient_id", "slice_idx", "fold", "model"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """clf2dc_5c trained one short epoch on each of the 3 folds."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pred")
    cache, folds = write_cache_and_folds(root, n_folds=N_FOLDS, n_patients=6, n_test_patients=2, size=32)
    runs = root / "runs"
    for k in range(N_FOLDS):
        args = ["train", str(TINY / "clf2dc_5c.yaml"), "--fold", str(k), "--cache", str(cache), "--folds", str(folds)]
        assert main([*args, "--runs", str(runs), "train.epochs=1", "data.samples_per_epoch=16"]) == 0
    return cache, folds, runs / "clf2dc_5c"


def test_oof_covers_every_training_slice_once(trained):
    cache, _, run = trained
    for k in range(N_FOLDS):
        assert main(["predict", str(run), "--fold", str(k), "--split", "oof", "--tta", "none", "transpose"]) == 0
    oof = pd.concat([pd.read_parquet(run / f"fold_{k}" / "oof.parquet") for k in range(N_FOLDS)])
    index = pd.read_parquet(cache / "cache_index.parquet")
    train = index[index["split"] == "train"]
    assert oof["sop_uid"].is_unique
    assert set(oof["sop_uid"]) == set(train["sop_uid"])
    assert list(oof.columns) == [*KEYS, *PROB_COLUMNS, *CLASSES]
    merged = oof.merge(train, on="sop_uid", suffixes=("", "_idx"))
    assert (merged["slice_idx"] == merged["z"]).all()
    np.testing.assert_array_equal(merged[list(CLASSES)].to_numpy(), merged[[f"{c}_idx" for c in CLASSES]].to_numpy())
    probs = oof[list(PROB_COLUMNS)].to_numpy()
    assert np.isfinite(probs).all() and (probs > 0).all() and (probs < 1).all()
    assert (oof["model"] == "clf2dc_5c").all()
    # Each fold predicted exactly its own patients.
    folds = pd.read_csv(trained[1], dtype={"patient_id": str})
    assert (oof.merge(folds, on="patient_id", suffixes=("", "_f")).eval("fold == fold_f")).all()


def test_test_split_and_tta_average(trained):
    cache, _, run = trained
    paths = {}
    for tta in (["none"], ["hflip"], ["none", "hflip"]):
        out = run / "fold_0" / f"test_{'_'.join(tta)}.parquet"
        assert main(["predict", str(run), "--fold", "0", "--split", "test", "--tta", *tta, "--out", str(out)]) == 0
        paths[tuple(tta)] = pd.read_parquet(out)
    df = paths[("none", "hflip")]
    index = pd.read_parquet(cache / "cache_index.parquet")
    assert set(df["sop_uid"]) == set(index.loc[index["split"] == "test", "sop_uid"])
    assert list(df.columns) == [*KEYS, *PROB_COLUMNS] and (df["fold"] == 0).all()
    mean = (paths[("none",)][list(PROB_COLUMNS)].to_numpy() + paths[("hflip",)][list(PROB_COLUMNS)].to_numpy()) / 2
    np.testing.assert_allclose(df[list(PROB_COLUMNS)].to_numpy(), mean, rtol=1e-5, atol=1e-6)


def test_tta_views_and_errors(trained):
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    for name, f in TTA.items():
        torch.testing.assert_close(f(f(x)), x, msg=name)  # every view is its own inverse
    torch.testing.assert_close(TTA["transpose"](x)[0, 0, 1, 2], x[0, 0, 2, 1])
    assert parse_tta(["identity", "none", "vflip"]) == ["none", "vflip"]
    with pytest.raises(UserError, match="unknown TTA"):
        parse_tta(["rot45"])
    with pytest.raises(UserError, match="checkpoint not found"):
        from rsna19.inference.predict import predict

        predict(trained[2], 7, "oof")
