"""Loading base-model predictions: joins on sop_uid, fold checks and clear errors."""

from __future__ import annotations

import pandas as pd
import pytest
from predfactory import make_work_dir

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.stacking.inputs import discover_models, load_base_inputs, read_test_labels


@pytest.fixture
def work(tmp_path):
    return make_work_dir(tmp_path / "work", n_patients=15, n_test_patients=4)


def _load(work, **kw):
    return load_base_inputs(work.runs, kw.pop("models", work.models), work.folds_csv, **kw)


def test_loads_and_averages_test(work):
    inputs = _load(work, test_labels=work.test_labels)
    assert inputs.models == work.models
    assert inputs.folds == [0, 1, 2, 3, 4]
    for m in work.models:
        assert len(inputs.oof[m]) == len(work.train)
        assert set(inputs.oof[m]["sop_uid"]) == set(work.train["sop_uid"])
        assert len(inputs.test[m]) == len(work.test)
    # Test predictions are the mean of the five folds' predictions.
    m = work.models[0]
    folds = [pd.read_parquet(work.runs / m / f"fold_{k}" / "test.parquet").set_index("sop_uid") for k in range(5)]
    want = sum(f["p_any"] for f in folds) / 5
    got = inputs.test[m].set_index("sop_uid")["p_any"]
    pd.testing.assert_series_equal(got.loc[want.index], want, check_names=False)
    assert list(inputs.test_labels.columns) == list(CLASSES)
    assert len(inputs.test_labels) == len(work.test)


def test_discover_models(work):
    assert discover_models(work.runs) == sorted(work.models)
    assert _load(work, models=[]).models == sorted(work.models)


def test_missing_rows_name_model_and_count(work):
    path = work.runs / "m_seq" / "fold_2" / "oof.parquet"
    df = pd.read_parquet(path)
    df.iloc[3:].to_parquet(path, index=False)
    with pytest.raises(UserError, match=r"model 'm_seq' has 3 missing and 0 extra row\(s\)"):
        _load(work)


def _add_extra_rows(path, n=2):
    df = pd.read_parquet(path)
    extra = df.iloc[:n].assign(sop_uid=[f"ID_extra{i:04d}" for i in range(n)])
    pd.concat([df, extra]).to_parquet(path, index=False)


def test_extra_rows_name_model_and_count(work):
    _add_extra_rows(work.runs / "m_2p5d" / "fold_3" / "test.parquet")
    with pytest.raises(UserError, match=r"'m_2p5d', fold 3: 0 slice\(s\) missing and 2 extra compared with fold 0"):
        _load(work)
    # The same extra rows in every fold of the model: the join across models names it.
    for k in (0, 1, 2, 4):
        _add_extra_rows(work.runs / "m_2p5d" / f"fold_{k}" / "test.parquet")
    with pytest.raises(UserError, match=r"test predictions do not join.*'m_2p5d' has 0 missing and 2 extra"):
        _load(work)


def test_fold_mismatch_is_an_error(work):
    path = work.runs / "m_resnet" / "fold_1" / "oof.parquet"
    df = pd.read_parquet(path)
    df.assign(fold=4).to_parquet(path, index=False)
    with pytest.raises(UserError, match=rf"'m_resnet': {len(df)} row\(s\) carry a fold that differs"):
        _load(work)


def test_missing_file_and_column(work):
    (work.runs / "m_seq" / "fold_3" / "oof.parquet").unlink()
    with pytest.raises(UserError, match=r"not found: .*m_seq/fold_3/oof.parquet"):
        _load(work)
    with pytest.raises(UserError, match="folds csv not found"):
        load_base_inputs(work.runs, work.models, work.root / "nope.csv")


def test_subset_of_folds_and_too_few(work):
    inputs = _load(work, folds=[0, 1])
    folds = inputs.oof[work.models[0]]["fold"]
    assert set(folds) == {0, 1}
    with pytest.raises(UserError, match="at least two folds"):
        _load(work, folds=[0])


def test_incomplete_test_labels(work, tmp_path):
    df = pd.read_csv(work.test_labels)
    df.iloc[1:].to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(UserError, match="lack a label"):
        read_test_labels(tmp_path / "labels.csv")
