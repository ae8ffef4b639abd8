"""The competition metric and its companions (docs/architecture.md, "Metric").

Weighted multi-label log loss: for each slice, ``Σ_c w_c · BCE(y_c, p_c) / Σ_c w_c`` with ``w = 1`` for the
five subtypes and ``2`` for ``any``; averaged over slices; probabilities clipped to ``[1e-15, 1 − 1e-15]``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import binomtest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score

from rsna19.core.constants import CLASS_WEIGHTS, CLASSES

EPS = 1e-15


def _as_2d(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or y_true.shape[1] != len(CLASSES):
        raise ValueError(f"expected (N, {len(CLASSES)}) labels and predictions, got {y_true.shape} and {y_pred.shape}")
    if not np.isfinite(y_pred).all():
        raise ValueError("predictions contain NaN or inf")
    return y_true, np.clip(y_pred, EPS, 1 - EPS)


def binary_log_loss(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Element-wise binary cross-entropy of clipped probabilities (any shape)."""
    y_true = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(y_pred, dtype=np.float64), EPS, 1 - EPS)
    return -(y_true * np.log(p) + (1 - y_true) * np.log1p(-p))


def weighted_log_loss(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Competition metric.

    Args:
        y_true: (N, 6) labels in :data:`rsna19.core.constants.CLASSES` order.
        y_pred: (N, 6) probabilities, same order.

    Returns:
        The mean over slices of the class-weighted BCE.
    """
    y_true, y_pred = _as_2d(y_true, y_pred)
    w = np.asarray(CLASS_WEIGHTS)
    per_slice = (binary_log_loss(y_true, y_pred) * w).sum(axis=1) / w.sum()
    return float(per_slice.mean())


def per_class_log_loss(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Mean BCE of each class: ``{class: loss}``."""
    y_true, y_pred = _as_2d(y_true, y_pred)
    losses = binary_log_loss(y_true, y_pred).mean(axis=0)
    return {c: float(v) for c, v in zip(CLASSES, losses)}


def per_class_auc(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """ROC AUC of each class; NaN where a class has only one label value."""
    y_true, y_pred = _as_2d(y_true, y_pred)
    out = {}
    for i, c in enumerate(CLASSES):
        col = y_true[:, i]
        out[c] = float(roc_auc_score(col, y_pred[:, i])) if 0 < col.sum() < len(col) else float("nan")
    return out


def study_auc_any(study_ids: np.ndarray, y_any: np.ndarray, p_any: np.ndarray) -> float:
    """Study-level AUC of ``any``: a study is positive if any slice is; its score is the max slice probability."""
    df = pd.DataFrame({"s": np.asarray(study_ids), "y": np.asarray(y_any, float), "p": np.asarray(p_any, float)})
    g = df.groupby("s").max()
    if g["y"].nunique() < 2:
        return float("nan")
    return float(roc_auc_score(g["y"], g["p"]))


def score_table(y_true: np.ndarray, y_pred: np.ndarray, study_ids: np.ndarray | None = None) -> dict[str, float]:
    """All scores in one flat dict: ``wll``, ``loss_<class>``, ``auc_<class>`` and ``study_auc_any``."""
    out: dict[str, float] = {"wll": weighted_log_loss(y_true, y_pred)}
    out.update({f"loss_{c}": v for c, v in per_class_log_loss(y_true, y_pred).items()})
    out.update({f"auc_{c}": v for c, v in per_class_auc(y_true, y_pred).items()})
    if study_ids is not None:
        out["study_auc_any"] = study_auc_any(study_ids, np.asarray(y_true)[:, -1], np.asarray(y_pred)[:, -1])
    return out


# ------------------------------------------------------------------------------------ binary decision metrics
def _binary(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and probabilities differ in length: {y.shape} vs {p.shape}")
    if not np.isfinite(p).all() or p.min(initial=0) < 0 or p.max(initial=0) > 1:
        raise ValueError("probabilities must be finite and in [0, 1]")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y, p


def binary_auc(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """ROC AUC; NaN when only one label value occurs."""
    y, p = _binary(y_true, y_prob)
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def sensitivity_specificity(y_true: np.ndarray, y_prob: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of the decision ``p >= threshold``; NaN for a side without examples."""
    y, p = _binary(y_true, y_prob)
    pred = p >= threshold
    pos, neg = y > 0.5, y < 0.5
    sens = float(pred[pos].mean()) if pos.any() else float("nan")
    spec = float((~pred[neg]).mean()) if neg.any() else float("nan")
    return sens, spec


def brier_score(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """Mean squared difference between probability and label (scikit-learn's ``brier_score_loss``)."""
    y, p = _binary(y_true, y_prob)
    return float(brier_score_loss(y, p, pos_label=1.0))


def reliability_bins(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Equal-width probability bins: scikit-learn's ``calibration_curve`` (``strategy="uniform"``) plus the counts.

    Returns:
        One row per bin (also empty ones): ``lo, hi, n, mean_prob, frac_pos`` (NaN means for an empty bin).
    """
    y, p = _binary(y_true, y_prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    n = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)  # calibration_curve's own bin ids
    mean_prob, frac_pos = np.full(n_bins, np.nan), np.full(n_bins, np.nan)
    if len(y):
        frac, mean = calibration_curve(y, p, n_bins=n_bins, strategy="uniform", pos_label=1.0)
        frac_pos[n > 0], mean_prob[n > 0] = frac, mean
    return pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "n": n, "mean_prob": mean_prob, "frac_pos": frac_pos})


def expected_calibration_error(y_true: np.ndarray, y_prob: np.ndarray, n_bins: int = 10) -> float:
    """ECE: ``Σ_b (n_b / N) · |mean probability_b − fraction positive_b|`` over equal-width bins."""
    bins = reliability_bins(y_true, y_prob, n_bins)
    full = bins[bins["n"] > 0]
    if full.empty:
        return float("nan")
    return float((full["n"] * (full["mean_prob"] - full["frac_pos"]).abs()).sum() / full["n"].sum())


def decision_metrics(y_true: np.ndarray, y_prob: np.ndarray, threshold: float, n_bins: int = 10) -> dict[str, float]:
    """``n, n_pos, auc, threshold, sensitivity, specificity, brier, ece`` of one class (NaN where undefined)."""
    y, p = _binary(y_true, y_prob)
    sens, spec = sensitivity_specificity(y, p, threshold)
    return {
        "n": float(len(y)),
        "n_pos": float(y.sum()),
        "auc": binary_auc(y, p),
        "threshold": float(threshold),
        "sensitivity": sens,
        "specificity": spec,
        "brier": brier_score(y, p) if len(y) else float("nan"),
        "ece": expected_calibration_error(y, p, n_bins),
    }


# ----------------------------------------------------------------------------- intervals, bootstrap, agreement
def wilson_interval(k: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (SciPy's ``binomtest(k, n).proportion_ci``, 95 % by default).

    ``(nan, nan)`` when ``n`` is 0. Chosen over the Wald interval because it stays inside [0, 1] and keeps its
    coverage at the small counts and the proportions near 1 that sensitivities on a few dozen positive studies are.
    """
    if n <= 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The resamples of a bootstrap: ``(n_boot, n)`` indices drawn with replacement from ``range(n)``.

    ``numpy.random.default_rng(seed).integers(0, n, size=(n_boot, n))``: written out so that an independent check
    can draw the very same resamples.
    """
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def resample_weights(indices: np.ndarray, n: int) -> np.ndarray:
    """``(B, n)`` multiplicities of each item in each resample of :func:`bootstrap_indices` (float64)."""
    b = indices.shape[0]
    flat = (indices + np.arange(b)[:, None] * n).ravel()
    return np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float64)


def weighted_auc(y_true: np.ndarray, y_prob: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of many weighted copies of one sample at once (the bootstrap resamples), ties counted as one half.

    With integer weights (multiplicities) each value equals ``roc_auc_score`` of the resample it stands for.

    Args:
        y_true: (N,) 0/1 labels; y_prob: (N,) scores.
        weights: (B, N) non-negative weights (:func:`resample_weights`).

    Returns:
        (B,) AUCs; NaN for a resample without a positive or without a negative.
    """
    y = np.asarray(y_true, dtype=np.float64) > 0.5
    p = np.asarray(y_prob, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    values, group = np.unique(p, return_inverse=True)
    onehot = np.zeros((len(p), len(values)))
    onehot[np.arange(len(p)), group] = 1.0
    w_pos = (w * y) @ onehot  # (B, K): weight of the positives at each distinct score, ascending
    w_neg = (w * ~y) @ onehot
    below = np.cumsum(w_neg, axis=1) - w_neg  # negatives strictly below each score
    pairs = w_pos.sum(axis=1) * w_neg.sum(axis=1)
    wins = (w_pos * (below + 0.5 * w_neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap values (NaNs, i.e. undefined resamples, left out); NaNs when none is left."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(v, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def fleiss_kappa(ratings: np.ndarray) -> float:
    """Fleiss' κ of binary ratings: subjects rated by the same number of raters.

    Args:
        ratings: (N, R) 0/1, one row a subject, one column a rater (R ≥ 2; rows with a missing rating removed).

    Returns:
        ``(P̄ − P̄e) / (1 − P̄e)`` with ``P̄`` the mean pairwise agreement per subject and ``P̄e`` the agreement
        expected by chance from the overall category proportions; NaN without subjects, and NaN when every rating
        is the same category (``P̄e`` = 1: κ undefined).
    """
    r = np.asarray(ratings, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] < 2:
        return float("nan")
    n_raters = r.shape[1]
    counts = np.stack([(r == 0).sum(axis=1), (r == 1).sum(axis=1)], axis=1).astype(np.float64)  # (N, 2)
    p_subject = ((counts**2).sum(axis=1) - n_raters) / (n_raters * (n_raters - 1))
    share = counts.sum(axis=0) / counts.sum()
    p_bar, p_e = float(p_subject.mean()), float((share**2).sum())
    return float("nan") if p_e >= 1.0 else (p_bar - p_e) / (1.0 - p_e)
