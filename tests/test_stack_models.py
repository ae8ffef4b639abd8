"""The stackers one by one: convex weights, blend, LightGBM, MLP, inner split and post-processing."""

from __future__ import annotations

import numpy as np
import pytest

from rsna19.metrics import weighted_log_loss
from rsna19.stacking.base import inner_split
from rsna19.stacking.blend import fit_blend
from rsna19.stacking.config import LgbmConfig, MlpConfig
from rsna19.stacking.convex import ConvexStacker, combine, fit_convex_weights, fit_simplex_weights
from rsna19.stacking.features import Level2Data
from rsna19.stacking.lgbm import LgbmStacker
from rsna19.stacking.mlp import MlpStacker
from rsna19.stacking.postprocess import postprocess


def _problem(n: int = 600, seed: int = 0) -> tuple[Level2Data, np.ndarray]:
    """A learnable level-2 problem: two noisy members around the truth, 60 patients."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 6)) < 0.2).astype(float)
    y[:, 5] = y[:, :5].max(axis=1)
    logit = 3 * (2 * y - 1)
    good = 1 / (1 + np.exp(-(logit + rng.normal(0, 1.5, y.shape))))
    bad = 1 / (1 + np.exp(-(0.3 * logit + rng.normal(0, 2.0, y.shape))))
    base = np.stack([good, bad], axis=1).astype(np.float32)  # (N, 2, 6)
    X = np.concatenate([good, bad, rng.random((n, 2))], axis=1).astype(np.float32)
    prob_mask = np.array([True] * 12 + [False] * 2)
    groups = np.repeat([f"P{i:03d}" for i in range(60)], n // 60)
    return Level2Data(X, [f"f{i}" for i in range(14)], prob_mask, base, groups), y


def test_simplex_weights_prefer_the_better_member():
    data, y = _problem()
    w = fit_simplex_weights(data.base[:, :, [5]], y[:, [5]])
    assert w.shape == (2,) and np.all(w >= 0) and w.sum() == pytest.approx(1)
    assert w[0] > 0.8
    W = fit_convex_weights(data.base, y, per_class=False)
    assert W.shape == (2, 6) and np.allclose(W, W[:, :1])
    assert fit_simplex_weights(data.base[:, :1], y).tolist() == [1.0]


def test_convex_stacker_not_worse_than_members():
    data, y = _problem()
    st = ConvexStacker(per_class=True)
    st.fit(data, y)
    p = st.predict(data)
    assert st.weights.shape == (2, 6) and np.allclose(st.weights.sum(axis=0), 1)
    assert weighted_log_loss(y, p) <= weighted_log_loss(y, data.base[:, 0]) + 1e-9


def test_blend_is_cross_fitted_and_convex():
    data, y = _problem()
    folds = np.repeat(np.arange(5), len(y) // 5)
    members = {"a": data.base[:, 0].astype(float), "b": data.base[:, 1].astype(float)}
    res = fit_blend(members, members, y, folds)
    assert res.members == ["a", "b"]
    assert np.all(res.weights >= 0) and np.allclose(res.weights.sum(axis=0), 1)
    assert res.oof.shape == y.shape and res.test.shape == y.shape
    # The OOF rows of fold 0 use weights fitted without fold 0.
    P = np.stack([members["a"], members["b"]], axis=1)
    held = folds == 0
    np.testing.assert_allclose(res.oof[held], combine(P[held], fit_convex_weights(P[~held], y[~held])))


def test_inner_split_groups_patients():
    groups = np.repeat(np.arange(20), 3)
    tr, va = inner_split(groups, 0.25, seed=1)
    assert len(np.intersect1d(groups[tr], groups[va])) == 0
    assert len(np.unique(groups[va])) == 5 and len(tr) + len(va) == len(groups)
    tr2, va2 = inner_split(groups, 0.25, seed=1)
    assert np.array_equal(va, va2)
    with pytest.raises(ValueError):
        inner_split(np.zeros(4), 0.5, 0)


def test_lgbm_learns_and_handles_a_constant_class():
    data, y = _problem()
    y[:, 0] = 0  # no epidural at all
    cfg = LgbmConfig(num_boost_round=40, early_stopping_rounds=5, num_leaves=7, min_data_in_leaf=10, num_threads=1)
    st = LgbmStacker(cfg, seed=0)
    st.fit(data, y)
    p = st.predict(data)
    assert p.shape == y.shape and np.isfinite(p).all()
    assert np.allclose(p[:, 0], p[0, 0]) and 0 < p[0, 0] < 0.01
    assert weighted_log_loss(y, p) < weighted_log_loss(y, data.base[:, 1])
    p2 = LgbmStacker(cfg, seed=0)
    p2.fit(data, y)
    np.testing.assert_array_equal(p2.predict(data), p)  # deterministic


def test_mlp_learns():
    data, y = _problem()
    st = MlpStacker(MlpConfig(hidden=(16,), epochs=15, batch_size=64, num_threads=1), seed=0)
    st.fit(data, y)
    p = st.predict(data)
    assert p.shape == y.shape and ((p > 0) & (p < 1)).all()
    assert weighted_log_loss(y, p) < weighted_log_loss(y, np.full_like(p, y.mean(axis=0)))
    assert st.history and len(st.history) <= 15


def test_postprocess():
    p = np.array([[0.1, 0.7, 0.0, 0.0, 0.2, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    out = postprocess(p)
    assert out[0, 5] == 0.7 and out[0, :5].tolist() == pytest.approx([0.1, 0.7, 1e-6, 1e-6, 0.2])
    assert out[1, 5] == 1 - 1e-6 and out[1, 0] == 1e-6
    assert postprocess(p, any_ge_max=False, clip=0)[0, 5] == 0.5
    assert p[0, 5] == 0.5  # input untouched
    with pytest.raises(ValueError):
        postprocess(np.zeros((3, 5)))
