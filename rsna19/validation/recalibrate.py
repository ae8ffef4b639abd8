"""Recalibrate a bundle for a site: the study model (Platt calibration and operating point per class) refitted on
the site's own labelled studies, with cross-validated numbers so that what is reported about it stays honest.

The new study model keeps the bundle's study score, target sensitivities and slice thresholds (a site has study
labels only); per class with at least one labelled study it replaces ``a, b`` and the operating point by those
fitted on every labelled study of the site (:func:`rsna19.core.calibration.fit_study_class`). A class without labels
keeps the bundle's entry (``recalibrated: false``).

**Cross-validation.** Fitting and judging on the same studies flatters both the calibration and the operating
point, so the numbers reported for the recalibrated model come from ``k`` folds (default 5): each study's
probability and flag come from a model fitted on the other folds (its own Platt fit and its own threshold). The
folds are drawn once per run (seeded), stratified on ``any`` (studies without an ``any`` reference form their own
stratum), and shared by every class.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd

from rsna19.core.calibration import apply_platt, fit_study_class
from rsna19.core.constants import CLASSES


def stratified_folds(y_any: np.ndarray, k: int, seed: int) -> np.ndarray:
    """(N,) fold ids in ``range(k)``: each stratum (0, 1, missing) shuffled and dealt round-robin."""
    y = np.asarray(y_any, dtype=np.float64)
    rng = np.random.default_rng([seed, 18])
    folds = np.zeros(len(y), dtype=np.int64)
    start = 0
    for stratum in (y == 1, y == 0, np.isnan(y)):
        idx = rng.permutation(np.flatnonzero(stratum))
        folds[idx] = (start + np.arange(len(idx))) % k
        start += len(idx)  # the next stratum continues the deal, so small strata do not all land in fold 0
    return folds


def cross_validate(
    model: dict[str, Any], scores: pd.DataFrame, labels: pd.DataFrame, folds: np.ndarray
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Out-of-fold calibrated probabilities and flags of a study model refitted per fold.

    Args:
        model: the bundle's study model (its target sensitivities are kept).
        scores: one row a study, ``CLASSES`` columns: the study scores.
        labels: the same rows: 0/1 references, NaN where a study has none for a class.
        folds: (N,) fold id of each row.

    Returns:
        ``(p_cv, flag_cv)``, same index and columns as ``scores``; NaN / False where a study has no reference.
    """
    p_cv = pd.DataFrame(np.nan, index=scores.index, columns=list(CLASSES))
    flag_cv = pd.DataFrame(False, index=scores.index, columns=list(CLASSES))
    for c in CLASSES:
        target = float(model["classes"][c]["target_sensitivity"])
        s, y = scores[c].to_numpy(dtype=np.float64), labels[c].to_numpy(dtype=np.float64)
        known = ~np.isnan(y)
        for f in np.unique(folds):
            train, test = known & (folds != f), known & (folds == f)
            if not test.any():
                continue
            e = fit_study_class(s[train], y[train], target)
            p = apply_platt(s[test], e["a"], e["b"])
            p_cv.loc[test, c] = p
            flag_cv.loc[test, c] = p >= e["threshold"]
    return p_cv, flag_cv


def refit_study_model(
    model: dict[str, Any], scores: pd.DataFrame, labels: pd.DataFrame, source: dict[str, Any]
) -> dict[str, Any]:
    """The bundle's study model with every labelled class refitted on all the site's studies.

    Args:
        model: the bundle's study model (not changed).
        scores, labels: as in :func:`cross_validate`.
        source: what the site's studies are (stored under ``source.recalibration``).

    Returns:
        The new study model (``study_model.json``); each class gets ``recalibrated`` (bool).
    """
    new = copy.deepcopy(model)
    n_used = 0
    for c in CLASSES:
        y = labels[c].to_numpy(dtype=np.float64)
        known = ~np.isnan(y)
        entry = new["classes"][c]
        if not known.any():
            entry["recalibrated"] = False
            continue
        n_used = max(n_used, int(known.sum()))
        fitted = fit_study_class(scores[c].to_numpy(dtype=np.float64)[known], y[known], entry["target_sensitivity"])
        entry |= fitted | {"recalibrated": True}
    new["n_studies"] = n_used
    new["source"] = {**model.get("source", {}), "recalibration": source}
    return new
