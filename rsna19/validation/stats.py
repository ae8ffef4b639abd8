"""Study-level validation numbers of one class: AUC and Brier score with bootstrap intervals, sensitivity and
specificity with Wilson intervals at several operating points, and the calibration error.

**Bootstrap.** The studies are resampled with replacement, ``B`` times (``--bootstrap``, default 2000), from
``numpy.random.default_rng(seed).integers(0, N, size=(B, N))`` over the N evaluated studies in ``studies.csv``
order (:func:`rsna19.core.metrics.bootstrap_indices`); every class uses the same resamples, restricted to the studies
that have a reference for it. The 95 % interval is the 2.5th–97.5th percentile of the resampled values; a
resample without a positive or without a negative has no AUC and is left out (``auc_boot_valid`` counts the rest).

**Sensitivity and specificity** get Wilson score intervals (:func:`rsna19.core.metrics.wilson_interval`). At the
thresholds chosen on these very studies (the ``sensitivity_0.90`` ... rows) the interval does not include the
uncertainty of the choice itself, so it is optimistic there; the bundle's operating point was chosen elsewhere.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rsna19.core.calibration import threshold_for_sensitivity, threshold_for_specificity
from rsna19.core.metrics import (
    binary_auc,
    brier_score,
    expected_calibration_error,
    percentile_interval,
    weighted_auc,
    wilson_interval,
)

#: Operating points of each class besides the bundle's: name → (kind, target).
TARGET_POINTS: dict[str, tuple[str, float]] = {
    "sensitivity_0.90": ("sensitivity", 0.90),
    "sensitivity_0.95": ("sensitivity", 0.95),
    "specificity_0.90": ("specificity", 0.90),
    "specificity_0.95": ("specificity", 0.95),
}
#: Columns of ``validation.csv`` (docs/contracts.md).
VALIDATION_COLUMNS: tuple[str, ...] = (
    "model",
    "class",
    "point",
    "threshold",
    "n",
    "n_pos",
    "n_neg",
    "auc",
    "auc_lo",
    "auc_hi",
    "auc_boot_valid",
    "brier",
    "brier_lo",
    "brier_hi",
    "ece",
    "tp",
    "fn",
    "tn",
    "fp",
    "sensitivity",
    "sensitivity_lo",
    "sensitivity_hi",
    "specificity",
    "specificity_lo",
    "specificity_hi",
)


def confusion(y: np.ndarray, flag: np.ndarray) -> dict[str, float]:
    """Counts, sensitivity and specificity (Wilson intervals) of the decisions ``flag`` against labels ``y``."""
    y, flag = np.asarray(y) > 0.5, np.asarray(flag, dtype=bool)
    tp, fn = int((flag & y).sum()), int((~flag & y).sum())
    tn, fp = int((~flag & ~y).sum()), int((flag & ~y).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    s_lo, s_hi = wilson_interval(tp, tp + fn)
    c_lo, c_hi = wilson_interval(tn, tn + fp)
    return {
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "sensitivity": sens,
        "sensitivity_lo": s_lo,
        "sensitivity_hi": s_hi,
        "specificity": spec,
        "specificity_lo": c_lo,
        "specificity_hi": c_hi,
    }


def ranking_metrics(y: np.ndarray, p: np.ndarray, weights: np.ndarray, n_bins: int = 10) -> dict[str, float]:
    """AUC and Brier score with bootstrap intervals, and the expected calibration error, of one class.

    Args:
        y: (N,) 0/1 references; p: (N,) probabilities.
        weights: (B, N) resample multiplicities of these studies (:func:`rsna19.core.metrics.resample_weights`).
        n_bins: equal-width bins of the calibration error.
    """
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    n_pos = int(y.sum())
    out: dict[str, float] = {"n": len(y), "n_pos": n_pos, "n_neg": len(y) - n_pos}
    boot_auc = weighted_auc(y, p, weights) if len(y) else np.array([])
    out["auc"] = binary_auc(y, p) if len(y) else float("nan")
    out["auc_lo"], out["auc_hi"] = percentile_interval(boot_auc)
    out["auc_boot_valid"] = int(np.isfinite(boot_auc).sum())
    if len(y):
        total = weights.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            boot_brier = (weights @ (p - y) ** 2) / total
        out["brier"] = brier_score(y, p)
        out["brier_lo"], out["brier_hi"] = percentile_interval(boot_brier)
        out["ece"] = expected_calibration_error(y, p, n_bins)
    else:
        out |= dict.fromkeys(("brier", "brier_lo", "brier_hi", "ece"), float("nan"))
    return out


def class_rows(
    cls: str, y: np.ndarray, p: np.ndarray, threshold: float, weights: np.ndarray, n_bins: int = 10
) -> list[dict[str, Any]]:
    """The ``validation.csv`` rows of one class for the bundle (``model`` = ``bundle``).

    Args:
        cls: the class; y: (N,) 0/1 references; p: (N,) calibrated study probabilities.
        threshold: the bundle's operating point of the class (``p >= threshold``: positive).
        weights: (B, N) bootstrap multiplicities of these studies.
        n_bins: bins of the calibration error.

    Returns:
        One row for the bundle's operating point, one per :data:`TARGET_POINTS` (threshold NaN, counts of the
        side that exists, when these data have no positive or no negative to choose it from).
    """
    common = {"model": "bundle", "class": cls, **ranking_metrics(y, p, weights, n_bins)}
    rows = [{**common, "point": "operating_point", "threshold": float(threshold), **confusion(y, p >= threshold)}]
    for name, (kind, target) in TARGET_POINTS.items():
        pick = threshold_for_sensitivity if kind == "sensitivity" else threshold_for_specificity
        thr, _, _ = pick(p, y, target) if len(y) else (None, math.nan, math.nan)
        flags = p >= thr if thr is not None else np.zeros(len(p), dtype=bool)
        row = {**common, "point": name, "threshold": float("nan") if thr is None else thr, **confusion(y, flags)}
        if thr is None:  # no threshold: nothing to report but the counts
            row |= dict.fromkeys(("sensitivity", "specificity", "sensitivity_lo", "sensitivity_hi"), float("nan"))
            row |= dict.fromkeys(("specificity_lo", "specificity_hi"), float("nan"))
        rows.append(row)
    return rows
