"""The stackers one by one: convex weights, blend, LightGBM, MLP, inner split and post-processing."""

from __future__ import annotations

import numpy as np
import pytest

from rsna19.core.metrics import weighted_log_loss
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


def test_blend_falls_back_on_the_best_base_model_when_it_loses_on_oof():
    rng = np.random.default_rng(0)
    n = 500
    y = (rng.random((n, 6)) < 0.3).astype(np.float64)
    folds = np.repeat(np.arange(5), n // 5)
    base = np.where(y == 1, 0.7, 0.3)  # a steady base model
    # A stacker that is excellent on folds 1-4 and inverted on fold 0: weights fitted without fold 0 trust it.
    good = np.where(y == 1, 0.95, 0.05)
    stacker = np.where((folds == 0)[:, None], 1 - good, good)
    oof = {"lgbm": stacker, "base:a": base}
    test = {"lgbm": np.full((7, 6), 0.9), "base:a": np.full((7, 6), 0.2)}
    plain = fit_blend(oof, test, y, folds, per_class=False)
    assert plain.fallback is None and weighted_log_loss(y, plain.oof) > weighted_log_loss(y, base)
    safe = fit_blend(oof, test, y, folds, per_class=False, fallback=True)
    assert safe.fallback == "base:a"
    np.testing.assert_array_equal(safe.oof, base)
    np.testing.assert_allclose(safe.test, test["base:a"])
    assert safe.weights[:, 0].tolist() == [0, 1] and np.all(safe.weights[1] == 1)
    # Where the blend wins, the safeguard leaves it alone.
    won = fit_blend({"lgbm": good, "base:a": base}, test, y, folds, per_class=False, fallback=True)
    assert won.fallback is None and weighted_log_loss(y, won.oof) < weighted_log_loss(y, base)


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


def _noise_problem(n: int = 600, seed: int = 3) -> tuple[Level2Data, np.ndarray]:
    """A calibrated member (labels drawn from its own probabilities) and features that are pure noise."""
    rng = np.random.default_rng(seed)
    good = rng.beta(0.6, 2.0, (n, 6))
    y = (rng.random((n, 6)) < good).astype(float)
    bad = np.clip(good + rng.normal(0, 0.2, good.shape), 0.01, 0.99)
    base = np.stack([good, bad], axis=1).astype(np.float32)
    X = rng.random((n, 14)).astype(np.float32)
    groups = np.repeat([f"P{i:03d}" for i in range(60)], n // 60)
    return Level2Data(X, [f"f{i}" for i in range(14)], np.array([True] * 12 + [False] * 2), base, groups), y


def test_lgbm_with_nothing_to_add_predicts_its_convex_start():
    from rsna19.stacking.start import fit_start, start_logit

    data, y = _noise_problem()
    cfg = LgbmConfig(num_boost_round=60, early_stopping_rounds=5, learning_rate=0.1, num_threads=1)
    st = LgbmStacker(cfg, seed=0)
    st.fit(data, y)
    start = 1 / (1 + np.exp(-start_logit(data.base, fit_start(data.base, y))))
    p = st.predict(data)
    kept = [c for c, b in enumerate(st.boosters) if b is None]
    assert kept, "noise features should leave at least one class at its start"
    np.testing.assert_allclose(p[:, kept], start[:, kept], rtol=1e-6)
    # A held-out copy of the problem: the residual stacker is no worse than its start (the convex blend).
    test, y_test = _noise_problem(seed=11)
    q_start = 1 / (1 + np.exp(-start_logit(test.base, st.start_weights)))
    assert weighted_log_loss(y_test, st.predict(test)) <= weighted_log_loss(y_test, q_start) * 1.02


def test_lgbm_capacity_follows_the_number_of_patients():
    st = LgbmStacker(LgbmConfig(num_leaves=31, min_data_in_leaf=20), seed=0)
    small = st.params(n_rows=1900, n_patients=80)
    assert small["num_leaves"] == 10 and small["min_data_in_leaf"] == 48
    big = st.params(n_rows=870_000, n_patients=17_000)
    assert big["num_leaves"] == 31 and big["min_data_in_leaf"] == 102
    fixed = LgbmStacker(LgbmConfig(num_leaves=31, capacity="fixed"), seed=0).params(n_rows=1900, n_patients=80)
    assert fixed["num_leaves"] == 31


def test_mlp_without_epochs_is_its_convex_start_and_saves_it(tmp_path):
    from rsna19.stacking.start import start_logit

    data, y = _problem()
    st = MlpStacker(MlpConfig(hidden=(16,), epochs=0, num_threads=1), seed=0)
    st.fit(data, y)
    expected = 1 / (1 + np.exp(-start_logit(data.base, st.start_weights)))
    np.testing.assert_allclose(st.predict(data), expected, rtol=1e-5)
    info = st.save(tmp_path)
    loaded = MlpStacker.load(info, lambda name: (tmp_path / name).read_bytes())
    np.testing.assert_allclose(loaded.predict(data), st.predict(data), rtol=1e-6)


def test_mlp_capacity_auto_caps_widths_by_patients():
    data, y = _problem()  # 60 patients; the inner split keeps ~51 for training
    st = MlpStacker(MlpConfig(hidden=(128, 64), epochs=1, num_threads=1), seed=0)
    st.fit(data, y)
    assert st.hidden == (30, 30)


def test_lgbm_round_trip_keeps_start_and_start_only_classes(tmp_path):
    data, y = _noise_problem()
    st = LgbmStacker(LgbmConfig(num_boost_round=60, early_stopping_rounds=5, num_threads=1), seed=0)
    st.fit(data, y)
    info = st.save(tmp_path)
    assert "start_weights" in info and any(e.get("start_only") for e in info["boosters"])
    loaded = LgbmStacker.load(info, lambda name: (tmp_path / name).read_bytes())
    np.testing.assert_allclose(loaded.predict(data), st.predict(data), rtol=1e-9)
