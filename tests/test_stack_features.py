"""Level-2 features: hand-checked on a 5-slice series, and the vectorised code against a per-series loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from predfactory import DEFAULT_MODELS, make_slices, predict

from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.stacking.features import Level2Data, build_features, feature_columns


def _frame(series: str, p_any: list[float], start_sop: int = 0) -> pd.DataFrame:
    n = len(p_any)
    df = pd.DataFrame(
        {
            "sop_uid": [f"ID_{start_sop + i:09x}" for i in range(n)],
            "series_uid": series,
            "study_uid": "ID_st" + series,
            "patient_id": "ID_pa" + series,
            "slice_idx": np.arange(n),
        }
    )
    for c in PROB_COLUMNS:
        df[c] = 0.0
    df["p_any"] = p_any
    df["p_epidural"] = np.arange(n) / 10
    return df


@pytest.fixture
def two_series() -> pd.DataFrame:
    """A 5-slice series and a 3-slice series, rows shuffled so the code must sort them."""
    df = pd.concat([_frame("A", [0.1, 0.2, 0.3, 0.4, 0.5]), _frame("B", [0.9, 0.8, 0.7], start_sop=100)])
    return df.sample(frac=1.0, random_state=0).reset_index(drop=True)


def test_features_by_hand(two_series):
    f = build_features({"m": two_series})
    a = f[f["series_uid"] == "A"].reset_index(drop=True)
    assert a["slice_idx"].tolist() == [0, 1, 2, 3, 4]

    def r6(values: pd.Series) -> list[float]:
        return [round(float(v), 6) for v in values]  # float32 features, compared at 6 digits

    def col(stat: str) -> list[float]:
        return r6(a[f"m__any__{stat}"])

    # Neighbours outside the series take the slice's own value and are flagged.
    assert col("off-2") == [0.1, 0.2, 0.1, 0.2, 0.3]
    assert col("off-1") == [0.1, 0.1, 0.2, 0.3, 0.4]
    assert col("off+0") == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert col("off+1") == [0.2, 0.3, 0.4, 0.5, 0.5]
    assert col("off+2") == [0.3, 0.4, 0.5, 0.4, 0.5]
    assert a["missing-2"].tolist() == [1, 1, 0, 0, 0]
    assert a["missing-1"].tolist() == [1, 0, 0, 0, 0]
    assert a["missing+1"].tolist() == [0, 0, 0, 0, 1]
    assert a["missing+2"].tolist() == [0, 0, 0, 1, 1]
    # Rolling statistics over the neighbours that exist.
    assert col("mean3") == [0.15, 0.2, 0.3, 0.4, 0.45]
    assert col("max3") == [0.2, 0.3, 0.4, 0.5, 0.5]
    assert col("mean5") == [0.2, 0.25, 0.3, 0.35, 0.4]
    assert col("max5") == [0.3, 0.4, 0.5, 0.5, 0.5]
    assert col("smax") == [0.5] * 5
    assert col("smean") == [0.3] * 5
    assert r6(a["rel_pos"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert a["n_slices"].tolist() == [5] * 5
    # The 3-slice series never sees series A's values across the boundary.
    b = f[f["series_uid"] == "B"].reset_index(drop=True)
    assert r6(b["m__any__off-1"]) == [0.9, 0.9, 0.8]
    assert r6(b["m__any__mean3"]) == [0.85, 0.8, 0.75]
    assert r6(b["m__any__mean5"]) == [0.8, 0.8, 0.8]
    assert r6(b["m__any__smax"]) == [0.9] * 3


def test_feature_names_and_counts(two_series):
    other = two_series.assign(**{c: 0.5 for c in PROB_COLUMNS})
    f = build_features({"m1": two_series, "m2": other}, offsets=1, windows=(3,))
    names = feature_columns(f)
    assert names[:4] == ["missing-1", "missing+1", "rel_pos", "n_slices"]
    # Per model, class by class: 3 offsets, mean and max of the window 3, the series max and mean.
    stats = ["off-1", "off+0", "off+1", "mean3", "max3", "smax", "smean"]
    assert names[4:] == [f"{m}__{c}__{s}" for m in ("m1", "m2") for c in CLASSES for s in stats]
    assert all(f[n].dtype == np.float32 for n in names)
    data = Level2Data.from_features(f, ["m1", "m2"])
    assert data.base.shape == (len(f), 2, 6)
    assert np.allclose(data.base[:, 1], 0.5)
    assert data.prob_mask.sum() == len(names) - 4


def _naive(df: pd.DataFrame, model: str) -> pd.DataFrame:
    """Reference implementation: a Python loop over series and slices."""
    rows = []
    for _, s in df.sort_values(["series_uid", "slice_idx"]).groupby("series_uid", sort=True):
        p = s[list(PROB_COLUMNS)].to_numpy()
        n = len(p)
        for i in range(n):
            row = {"sop_uid": s["sop_uid"].iloc[i]}
            for ci, c in enumerate(CLASSES):
                for k in range(-2, 3):
                    row[f"{model}__{c}__off{k:+d}"] = p[i + k, ci] if 0 <= i + k < n else p[i, ci]
                for w in (3, 5):
                    win = p[max(0, i - w // 2) : i + w // 2 + 1, ci]
                    row[f"{model}__{c}__mean{w}"] = win.mean()
                    row[f"{model}__{c}__max{w}"] = win.max()
                row[f"{model}__{c}__smax"] = p[:, ci].max()
                row[f"{model}__{c}__smean"] = p[:, ci].mean()
            rows.append(row)
    return pd.DataFrame(rows).set_index("sop_uid")


def test_vectorised_matches_loop():
    rng = np.random.default_rng(3)
    slices = make_slices(6, rng, set()).sort_values(["series_uid", "slice_idx"]).reset_index(drop=True)
    df = slices.copy()
    df[list(PROB_COLUMNS)] = predict(slices, DEFAULT_MODELS[0], np.zeros((len(slices), 6)), rng)
    got = build_features({"m": df.sample(frac=1.0, random_state=1)}).set_index("sop_uid")
    want = _naive(df, "m")
    np.testing.assert_allclose(got.loc[want.index, want.columns].to_numpy(), want.to_numpy(), rtol=1e-5, atol=1e-6)


def test_even_window_is_an_error(two_series):
    from rsna19.core.errors import UserError

    with pytest.raises(UserError, match="odd"):
        build_features({"m": two_series}, windows=(4,))
