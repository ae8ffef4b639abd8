"""Leakage and determinism: patients stay in one fold, test data never reaches training, a seed fixes the OOF.

* folds on the ``tiny`` synthetic dataset, from the index as ``rsna19 index`` writes it (patients with several
  studies included): every training patient in exactly one fold, no test patient in any;
* :func:`rsna19.pipeline.run.check_no_leakage` (what ``rsna19 run`` asserts after its folds stage) passes on the
  real split and refuses each kind of injected leak;
* the trainer refuses a folds file that would put held-out patients into training;
* the same seed gives identical OOF predictions on CPU for every family trained from the cache (``seq`` trains on
  embeddings: tests/test_families_e2e.py; ``clf2d`` with RAdam + one-cycle: tests/test_train.py).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from cachefactory import write_cache_and_folds
from tinyfamilies import EMBEDDINGS, MODELS

from rsna19.core.config import load_config
from rsna19.core.errors import UserError
from rsna19.data.folds import read_folds, split_by_fold, write_folds
from rsna19.engine.config import TrainConfig, resolve_paths
from rsna19.engine.embed import CheckpointOptions
from rsna19.inference.predict import predict
from rsna19.io.index import build_index
from rsna19.training.trainer import train

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"


@pytest.fixture(scope="module")
def tiny_folds(tiny_dataset, tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(index, folds) of the tiny synthetic dataset."""
    out = tmp_path_factory.mktemp("leak")
    index = build_index(
        [tiny_dataset / "stage_2_train", tiny_dataset / "stage_2_test"],
        tiny_dataset / "stage_2_train.csv",
        out / "index.parquet",
        progress=False,
    )
    write_folds(out / "index.parquet", out / "folds.csv", n_folds=2, seed=0)
    return index, read_folds(out / "folds.csv")


def test_no_patient_in_two_folds_on_the_tiny_preset(tiny_folds):
    index, folds = tiny_folds
    assert folds["patient_id"].is_unique
    train, test = index[index["split"] == "train"], index[index["split"] == "test"]
    assert set(folds["patient_id"]) == set(train["patient_id"])
    assert not set(folds["patient_id"]) & set(test["patient_id"])
    # Every study and series of a patient follows the patient (the preset has patients with several studies).
    rows = train.merge(folds, on="patient_id")
    assert rows.groupby("study_uid")["fold"].nunique().max() == 1
    assert rows.groupby("patient_id")["fold"].nunique().max() == 1
    assert train["patient_id"].map(train.groupby("patient_id")["study_uid"].nunique()).max() >= 2
    for k in sorted(folds["fold"].unique()):
        fit, held = split_by_fold(train, folds, int(k))
        assert not set(fit["patient_id"]) & set(held["patient_id"])
        assert len(fit) + len(held) == len(train)


def test_run_leakage_check_passes_and_catches_each_leak(tiny_folds):
    from rsna19.pipeline.layout import check_no_leakage

    index, folds = tiny_folds
    check_no_leakage(index, folds)

    twice = pd.concat([folds, folds.iloc[:1].assign(fold=(folds["fold"].iloc[0] + 1) % 2)], ignore_index=True)
    with pytest.raises(UserError, match="more than one fold"):
        check_no_leakage(index, twice)

    test_row = index[index["split"] == "test"].iloc[:1]
    as_train = pd.concat([index, test_row.assign(split="train")], ignore_index=True)  # a test slice in training
    with pytest.raises(UserError, match="leakage: 1 test slice"):
        check_no_leakage(as_train, folds)

    test_patient = str(test_row["patient_id"].iloc[0])
    with pytest.raises(UserError, match=f"leakage: test patient {test_patient} has a training fold"):
        check_no_leakage(index, pd.concat([folds, pd.DataFrame({"patient_id": [test_patient], "fold": [0]})]))

    with pytest.raises(UserError, match="have no fold"):
        check_no_leakage(index, folds.iloc[1:])


# ----------------------------------------------------------------------------------------------------------------
# Training on the cache


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cache_and_folds(tmp_path_factory.mktemp("leak_data"), n_patients=6, n_test_patients=1, size=32)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _cfg(data, runs: Path, name: str, *overrides: str) -> TrainConfig:
    cache, folds = data
    cfg = load_config(TrainConfig, TINY / f"{name}.yaml", ["train.epochs=1", "data.samples_per_epoch=8", *overrides])
    return resolve_paths(cfg, str(cache), str(folds), str(runs))


def test_trainer_refuses_folds_that_put_held_out_patients_in_training(data, tmp_path):
    cache, folds_csv = data
    folds = read_folds(folds_csv)
    index = pd.read_parquet(cache / "cache_index.parquet")
    # A patient missing from the folds file would be neither trained on nor validated: refused, not guessed.
    short = tmp_path / "folds.csv"
    folds.iloc[1:].to_csv(short, index=False)
    cfg = _cfg((cache, short), tmp_path / "runs", "clf2d")
    with pytest.raises(UserError, match="missing from the folds file"):
        train(cfg, fold=0)
    assert set(folds["patient_id"]) == set(index.loc[index["split"] == "train", "patient_id"])


@pytest.mark.parametrize("family", [m for m in MODELS if m not in EMBEDDINGS])
def test_same_seed_same_oof_on_cpu(data, tmp_path, family):
    preds = []
    for k in range(2):
        runs = tmp_path / f"r{k}"
        train(_cfg(data, runs, family), fold=0)
        preds.append(pd.read_parquet(predict(runs / family, 0, "oof", CheckpointOptions(tta=["none"]), progress=False)))
    pd.testing.assert_frame_equal(preds[0], preds[1], check_exact=True)
    # The OOF rows are exactly the held-out patients of fold 0.
    folds = read_folds(data[1])
    assert set(preds[0]["patient_id"]) == set(folds.loc[folds["fold"] == 0, "patient_id"])


@pytest.mark.parametrize("family", sorted(EMBEDDINGS))
def test_embedding_reader_same_seed_same_oof_on_cpu(data, tmp_path, family):
    """The families that read embeddings too: two trainings over the same embeddings give identical OOF predictions."""
    import shutil

    runs = tmp_path / "runs"
    train(_cfg(data, runs, EMBEDDINGS[family]), fold=0)
    preds = []
    for k in range(2):
        train(_cfg(data, runs, family, "data.embedding_source=fold"), fold=0)
        preds.append(pd.read_parquet(predict(runs / family, 0, "oof", progress=False)))
        shutil.move(runs / family, tmp_path / f"{family}{k}")  # the second training starts from nothing
    pd.testing.assert_frame_equal(preds[0], preds[1], check_exact=True)
    folds = read_folds(data[1])
    assert set(preds[0]["patient_id"]) == set(folds.loc[folds["fold"] == 0, "patient_id"])
