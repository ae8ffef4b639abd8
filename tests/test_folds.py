"""Folds: patient-grouped, stratified, seeded, written once; CLI and either index parquet accepted."""

from __future__ import annotations

import pandas as pd
import pytest
from cachefactory import write_cache

from rsna19.cli import main
from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.data.folds import make_folds, read_folds, split_by_fold


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_cache(tmp_path_factory.mktemp("cache"), n_patients=15, n_test_patients=2, size=16, slices=(3, 5))


def test_no_patient_in_two_folds_and_all_train_patients(cache):
    index = pd.read_parquet(cache / "cache_index.parquet")
    folds = make_folds(index, n_folds=3, seed=1)
    assert folds["patient_id"].is_unique
    assert set(folds["patient_id"]) == set(index.loc[index["split"] == "train", "patient_id"])
    assert set(folds["fold"]) == {0, 1, 2}
    # Patients with two studies: both studies' slices land in the same fold.
    merged = index[index["split"] == "train"].merge(folds, on="patient_id")
    assert (merged.groupby("patient_id")["fold"].nunique() == 1).all()
    assert merged.groupby("study_uid")["patient_id"].nunique().max() == 1


def test_same_seed_same_folds(cache):
    index = pd.read_parquet(cache / "cache_index.parquet")
    a, b = make_folds(index, 3, seed=7), make_folds(index, 3, seed=7)
    pd.testing.assert_frame_equal(a, b)
    others = [make_folds(index, 3, seed=s)["fold"].tolist() for s in range(8, 12)]
    assert any(o != a["fold"].tolist() for o in others)


def test_stratified_positive_studies_spread(cache):
    index = pd.read_parquet(cache / "cache_index.parquet")
    folds = make_folds(index, 3, seed=0)
    pos = index[index["split"] == "train"].groupby("patient_id")["any"].max().rename("pos").reset_index()
    per_fold = pos.merge(folds).groupby("fold")["pos"].sum()
    assert per_fold.min() >= 1  # every fold validates some bleeds


def test_cli_writes_once_and_accepts_index_parquet(cache, tmp_path, capsys):
    # A file-level index (no z/n_slices) is accepted as well as the cache index.
    index = pd.read_parquet(cache / "cache_index.parquet")
    idx = index[["sop_uid", "patient_id", "study_uid", "series_uid", "split", *CLASSES]]
    idx.to_parquet(tmp_path / "index.parquet")
    out = tmp_path / "folds.csv"
    assert main(["folds", str(tmp_path / "index.parquet"), "--out", str(out), "--n-folds", "3", "--seed", "3"]) == 0
    first = out.read_text()
    assert list(read_folds(out).columns) == ["patient_id", "fold"]
    # Second call with another seed keeps the file (written once) ...
    assert main(["folds", str(cache), "--out", str(out), "--n-folds", "3", "--seed", "4"]) == 0
    assert out.read_text() == first
    # ... and the cache index with the same seed gives the same folds.
    assert main(["folds", str(cache), "--out", str(tmp_path / "f2.csv"), "--n-folds", "3", "--seed", "3"]) == 0
    assert (tmp_path / "f2.csv").read_text() == first


def test_split_by_fold_and_errors(cache):
    index = pd.read_parquet(cache / "cache_index.parquet")
    folds = make_folds(index, 3, seed=0)
    train, val = split_by_fold(index, folds, 1)
    assert set(train["patient_id"]).isdisjoint(val["patient_id"])
    assert len(train) + len(val) == (index["split"] == "train").sum()
    with pytest.raises(UserError, match="not in 0..2"):
        split_by_fold(index, folds, 3)
    with pytest.raises(UserError, match="cannot make 50 folds"):
        make_folds(index, 50)
