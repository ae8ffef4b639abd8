"""Study-level calibration and operating points (rsna19.core.calibration) on synthetic OOF frames."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression

from rsna19.core.calibration import (
    FALLBACK_THRESHOLD,
    apply_platt,
    apply_study_model,
    calibrate_frame,
    check_study_model,
    consistent_flags,
    fit_platt,
    fit_study_class,
    fit_study_model,
    parse_sensitivity,
    study_scores,
    threshold_for_sensitivity,
)
from rsna19.core.constants import CLASSES, PROB_COLUMNS


def oof_frame(n_studies: int = 80, n_slices: int = 12, seed: int = 0) -> pd.DataFrame:
    """OOF slices of ``n_studies`` studies: positive studies have a run of slices with higher probabilities."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_studies):
        y_study = rng.random(len(CLASSES) - 1) < [0.1, 0.15, 0.1, 0.15, 0.2]
        for z in range(n_slices):
            lab = y_study & (abs(z - n_slices // 2) <= 2)
            p = np.clip(np.where(lab, rng.beta(4, 3, 5), rng.beta(1, 8, 5)), 0, 1)
            rows.append(
                {
                    "study_uid": f"ID_s{s:03d}",
                    "sop_uid": f"ID_{s:03d}{z:03d}",
                    **{c: float(v) for c, v in zip(CLASSES[:-1], lab)},
                    "any": float(lab.any()),
                    **{col: float(v) for col, v in zip(PROB_COLUMNS[:-1], p)},
                    "p_any": float(max(p.max(), rng.beta(1, 6))),
                }
            )
    return pd.DataFrame(rows)


def test_platt_matches_sklearn_on_the_smoothed_targets():
    """Platt's objective = a logistic regression on logit(score) whose rows carry the smoothed targets as weights."""
    rng = np.random.default_rng(1)
    y = (rng.random(300) < 0.3).astype(float)
    score = np.clip(1 / (1 + np.exp(-(rng.normal(size=300) + 1.5 * y - 1))), 1e-4, 1 - 1e-4)
    a, b, fitted = fit_platt(score, y)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    x = np.log(score / (1 - score))[:, None]
    X = np.concatenate([x, x])
    lab = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    ref = LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000).fit(X, lab, sample_weight=np.concatenate([t, 1 - t]))
    assert fitted
    assert a == pytest.approx(ref.coef_[0, 0], rel=1e-4)
    assert b == pytest.approx(ref.intercept_[0], abs=1e-4)
    np.testing.assert_allclose(apply_platt(score, a, b), ref.predict_proba(x)[:, 1], atol=1e-5)


def _platt_newton(score: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """An independent Platt fit: Newton's method with step halving on the smoothed-target log loss of
    ``logit(score)`` (what rsna19 computed by hand before it used scikit-learn)."""
    p = np.clip(score, 1e-6, 1 - 1e-6)
    x = np.log(p) - np.log1p(-p)
    n_pos, n_neg = y.sum(), len(y) - y.sum()
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    X = np.stack([x, np.ones_like(x)], axis=1)

    def nll(w: np.ndarray) -> float:
        z = X @ w
        return float(np.sum(t * np.logaddexp(0, -z) + (1 - t) * np.logaddexp(0, z)))

    w, f = np.array([1.0, 0.0]), nll(np.array([1.0, 0.0]))
    for _ in range(100):
        q = 1 / (1 + np.exp(-(X @ w)))
        step = np.linalg.solve((X * (q * (1 - q))[:, None]).T @ X + 1e-12 * np.eye(2), X.T @ (q - t))
        lr = 1.0
        while lr > 1e-10 and nll(w - lr * step) > f:
            lr /= 2
        w_new = w - lr * step
        f_new = nll(w_new)
        done = abs(f - f_new) < 1e-12 * max(1.0, abs(f))
        w, f = w_new, f_new
        if done:
            break
    return float(w[0]), float(w[1])


def test_platt_matches_newtons_method_within_1e_6():
    """On many problems (small, unbalanced, separable, scores of exactly 0 or 1) the library fit gives the same
    slope, intercept and calibrated probabilities as an independent Newton fit, to 1e-6."""
    rng = np.random.default_rng(7)
    for i in range(60):
        n = int(rng.integers(3, 300))
        y = (rng.random(n) < rng.uniform(0.02, 0.6)).astype(float)
        y[:2] = [0.0, 1.0]
        z = rng.normal(size=n) * rng.uniform(0.05, 3) + rng.uniform(-3, 8) * y - rng.uniform(-2, 3)
        score = 1 / (1 + np.exp(-z))
        if i % 5 == 0:
            score = np.where(rng.random(n) < 0.4, rng.choice([0.0, 1.0]), score)
        a, b, fitted = fit_platt(score, y)
        a_ref, b_ref = _platt_newton(score, y)
        assert fitted == (a_ref > 0)
        if fitted:
            assert abs(a - a_ref) < 1e-6 and abs(b - b_ref) < 1e-6, (i, a, a_ref, b, b_ref)
            np.testing.assert_allclose(apply_platt(score, a, b), apply_platt(score, a_ref, b_ref), atol=1e-6)


def test_platt_stays_finite_on_separable_studies_and_falls_back_without_positives():
    score = np.array([0.01, 0.02, 0.05, 0.9, 0.95, 0.99])
    a, b, fitted = fit_platt(score, np.array([0, 0, 0, 1, 1, 1]))
    assert fitted and 0 < a < 50 and math.isfinite(b)
    p = apply_platt(score, a, b)
    assert np.all(np.diff(p) > 0)  # monotone: the ranking is the score's
    # Smoothed targets 4/5 and 1/5: separated studies get confident, not certain, probabilities.
    assert 0.1 < p[0] < 0.3 and 0.7 < p[-1] < 0.9
    assert fit_platt(score, np.zeros(6)) == (1.0, 0.0, False)
    assert fit_platt(score, np.array([1, 1, 1, 0, 0, 0])) == (1.0, 0.0, False)  # a score that ranks backwards


def test_threshold_is_the_highest_with_the_target_sensitivity():
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    y = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 0])
    thr, sens, spec = threshold_for_sensitivity(p, y, 0.8)  # 5 positives: 4 must be caught
    assert thr == 0.4 and sens == 0.8 and spec == pytest.approx(3 / 5)
    thr, sens, _ = threshold_for_sensitivity(p, y, 0.95)
    assert thr == 0.1 and sens == 1.0
    assert threshold_for_sensitivity(p, np.zeros(10), 0.95)[0] is None
    # 0.95 · 20 is 19.000000000000004 in floating point: 19 of 20 positives, not 20.
    thr, sens, _ = threshold_for_sensitivity(np.linspace(1, 0.05, 20), np.ones(20), 0.95)
    assert sens == 0.95 and thr == pytest.approx(0.1)


def test_conformal_threshold_keeps_the_promise_for_a_new_study():
    # 39 positives at 0.95: rank ⌈0.95 · 40⌉ = 38 (the in-sample rule: ⌈37.05⌉ = 38 too); 36 positives: rank 36
    # (the lowest), where the in-sample rule takes 35 and promises 35 / 37 = 0.946 for a new study.
    for n, conformal_rank, in_sample_rank in ((39, 38, 38), (36, 36, 35), (10, 10, 10), (100, 96, 95)):
        p = np.linspace(0.99, 0.01, n)
        y = np.ones(n)
        assert threshold_for_sensitivity(p, y, 0.95, conformal=True)[0] == p[conformal_rank - 1]
        assert threshold_for_sensitivity(p, y, 0.95)[0] == p[in_sample_rank - 1]
    # The promise, checked by simulation: over exchangeable draws, a new positive passes the conformal threshold in
    # at least 95 % of cases; the in-sample threshold falls short with 36 positives.
    rng = np.random.default_rng(0)
    passed = {True: 0, False: 0}
    trials = 20000
    for _ in range(trials):
        scores = rng.random(37)  # 36 fitted on, one new
        for conformal in (True, False):
            thr = threshold_for_sensitivity(scores[:36], np.ones(36), 0.95, conformal=conformal)[0]
            passed[conformal] += scores[36] >= thr
    assert passed[True] / trials >= 0.95 - 0.01 and passed[False] / trials < 0.95
    # The bundle's study model uses it.
    score = np.r_[np.linspace(0.9, 0.5, 36), np.linspace(0.45, 0.05, 44)]
    y = np.r_[np.ones(36), np.zeros(44)]
    entry = fit_study_class(score, y, 0.95)
    assert entry["oof_sensitivity"] == 1.0 and entry["score_threshold"] == pytest.approx(0.5)


def test_parse_sensitivity():
    assert parse_sensitivity(None) == dict.fromkeys(CLASSES, 0.95)
    got = parse_sensitivity(["subdural=0.8", "0.9"])
    assert got["subdural"] == 0.8 and got["any"] == 0.9 and got["epidural"] == 0.9
    for bad in (["sdh=0.9"], ["any=1.5"], ["any=x"]):
        with pytest.raises(ValueError):
            parse_sensitivity(bad)


def test_study_model_round_trip_and_operating_points():
    oof = oof_frame()
    model = fit_study_model(oof, {"any": 0.9}, "max", source={"stack": "t"})
    model = json.loads(json.dumps(model, allow_nan=False))  # what the bundle stores
    check_study_model(model)
    assert model["n_studies"] == 80 and model["source"] == {"stack": "t"}
    for c in CLASSES:
        e = model["classes"][c]
        assert e["fitted"] and e["a"] > 0 and e["n_pos"] > 0
        assert e["oof_sensitivity"] >= e["target_sensitivity"]
    assert model["classes"]["any"]["target_sensitivity"] == 0.9

    cal = calibrate_frame(model, oof)
    labels = oof.groupby("study_uid")[list(CLASSES)].max()
    for c in CLASSES:
        e = model["classes"][c]
        flags, y = cal[f"flag_{c}"].to_numpy(), labels[c].to_numpy() > 0
        assert flags[y].mean() == pytest.approx(e["oof_sensitivity"])
        assert (~flags[~y]).mean() == pytest.approx(e["oof_specificity"])
        assert (cal[f"score_{c}"] == oof.groupby("study_uid")[f"p_{c}"].max()).all()
    # One study through apply_study_model: the same numbers and flags as the frame version.
    uid = cal.index[3]
    one = apply_study_model(model, oof[oof["study_uid"] == uid])
    for c in CLASSES:
        assert one["classes"][c]["probability"] == pytest.approx(cal.at[uid, f"p_{c}"], abs=1e-6)
        assert one["classes"][c]["above_operating_point"] == bool(cal.at[uid, f"flag_{c}"])
        # Reported: a subtype only within a positive any.
        assert one["classes"][c]["positive"] == bool(cal.at[uid, f"flag_{c}"] and cal.at[uid, "flag_any"])
    assert one["flag"] == ("positive" if cal.at[uid, "flag_any"] else "negative")


def test_a_study_is_scored_per_fold_like_its_out_of_fold_studies():
    """With each fold's predictions, the study score is the mean of the folds' own maxima: two folds that put their
    worst slice on different slices score the study as each alone would, not by the lower maximum of their mean."""
    model = {
        "score": "max",
        "method": "platt",
        "classes": {c: {"a": 1.0, "b": 0.0, "threshold": 0.6, "target_sensitivity": 0.95} for c in CLASSES},
    }
    fold_a = pd.DataFrame([[0.1] * 5 + [0.9], [0.1] * 5 + [0.2]], columns=list(PROB_COLUMNS))
    fold_b = pd.DataFrame([[0.1] * 5 + [0.2], [0.1] * 5 + [0.8]], columns=list(PROB_COLUMNS))
    mean = (fold_a + fold_b) / 2  # p_any 0.55 / 0.5: its maximum 0.55 is below either fold's own
    averaged = apply_study_model(model, mean)
    per_fold = apply_study_model(model, mean, [fold_a, fold_b])
    assert averaged["folds"] == 0 and averaged["classes"]["any"]["score"] == pytest.approx(0.55)
    assert per_fold["folds"] == 2 and per_fold["classes"]["any"]["score"] == pytest.approx(0.85)
    assert per_fold["classes"]["any"]["probability"] == pytest.approx(apply_platt(0.85, 1.0, 0.0))
    assert averaged["flag"] == "negative" and per_fold["flag"] == "positive"


def test_subtypes_are_reported_only_within_a_positive_any():
    """Each class has its own operating point; a subtype over its own on an any-negative study is withheld."""
    slices = pd.DataFrame([[0.3, 0.05, 0.05, 0.05, 0.4, 0.2]], columns=list(PROB_COLUMNS))
    model = {
        "score": "max",
        "method": "platt",
        "classes": {c: {"a": 1.0, "b": 0.0, "threshold": 0.74 if c == "any" else 0.1, "target_sensitivity": 0.95}
                    for c in CLASSES},
    }  # fmt: skip
    negative = apply_study_model(model, slices)
    assert negative["flag"] == "negative" and negative["positive_classes"] == []
    assert negative["subtypes_withheld"] == ["epidural", "subdural"]
    assert negative["classes"]["subdural"]["above_operating_point"] and not negative["classes"]["subdural"]["positive"]
    positive = apply_study_model(model, slices.assign(p_any=0.9))
    assert positive["positive_classes"] == ["epidural", "subdural", "any"] and positive["subtypes_withheld"] == []
    flags, withheld = consistent_flags(dict.fromkeys(CLASSES, True) | {"any": False})
    assert not any(flags.values()) and withheld == list(CLASSES[:-1])


def test_top3_mean_score_and_a_class_without_positives():
    oof = oof_frame(n_studies=30, seed=3)
    oof["epidural"] = 0.0
    model = fit_study_model(oof, None, "top3_mean")
    e = model["classes"]["epidural"]
    assert not e["fitted"] and not e["threshold_chosen"] and e["threshold"] == FALLBACK_THRESHOLD
    assert e["oof_sensitivity"] is None
    json.dumps(model, allow_nan=False)
    scores = study_scores(oof, "top3_mean")
    first = oof[oof["study_uid"] == scores.index[0]]["p_any"].nlargest(3).mean()
    assert scores["any"].iloc[0] == pytest.approx(first)


def test_invalid_study_models_are_refused():
    model = fit_study_model(oof_frame(n_studies=20))
    bad = json.loads(json.dumps(model))
    bad["classes"]["any"]["threshold"] = None
    with pytest.raises(ValueError, match="any.threshold"):
        check_study_model(bad, "x.json")
    bad = json.loads(json.dumps(model))
    del bad["classes"]["subdural"]
    with pytest.raises(ValueError, match="classes"):
        check_study_model(bad)
    with pytest.raises(ValueError, match="labels"):
        fit_study_model(oof_frame(n_studies=5).assign(any=np.nan))
