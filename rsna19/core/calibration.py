"""Study-level result: a calibrated probability per class and an operating point chosen for a sensitivity.

A study's **score** for class c is a summary of its slices' stacked probabilities: ``max`` (the most suspicious
slice, what ``studies.json`` has always reported as ``max_probability``) or ``top3_mean`` (the mean of the three
highest, less driven by a single noisy slice). The **study model** maps that score to a calibrated probability
with Platt scaling on the logit of the score::

    p_cal = sigmoid(a · logit(score) + b)

fitted on the out-of-fold (OOF) studies of a pipeline run, per class. Why this and nothing richer: a run has
tens of OOF studies (80 in the demo, a few positive for the rarer subtypes), so a model with more than two
parameters per class (logistic regression on max, top-k mean and counts; isotonic regression's step function)
would fit the noise of a handful of positives, and isotonic steps tie studies together, which loses ranking and
makes a threshold ambiguous. Platt's two parameters are monotone in the score (the ranking, hence the AUC, is the
stacker's own), and Platt's smoothed targets ``(N₊ + 1) / (N₊ + 2)`` and ``1 / (N₋ + 2)`` keep the fit finite
when the OOF studies are perfectly separated, which small demo runs often are. A fit whose slope is not positive
(a score that does not rank) is replaced by the identity (``a = 1, b = 0``) and marked ``fitted: false``.

The **operating point** of class c is a promise about new studies, so it is chosen the split-conformal way: the
⌈target · (N₊ + 1)⌉-th highest calibrated probability of the N₊ positive OOF studies (default target 0.95). A new
positive study from the same population then ranks above it with probability ≥ target (its rank among the N₊ + 1
is uniform), which the in-sample rule, the ⌈target · N₊⌉-th highest, does not give: with 36 positives it promises
35 / 37 = 0.946. Where ⌈target · (N₊ + 1)⌉ > N₊ (fewer than 19 positives at 0.95) the lowest positive is used, and
the promise is only what N₊ positives can back. A study is flagged positive when ``p_cal >= threshold``. The
in-sample rule on OOF slice probabilities gives a slice-level threshold (what ``rsna19 evaluate`` uses for slice
sensitivity and specificity; ``rsna19 validate`` reports in-sample thresholds too, as descriptions of the site's
studies). Without a positive OOF study no threshold can be chosen; the class falls back to 0.5 and says so.

The study model is plain JSON (:func:`fit_study_model` returns it, :func:`check_study_model` validates a loaded
one, :func:`apply_study_model` uses it); ``rsna19 bundle`` stores it as ``study_model.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from rsna19.core.constants import CLASSES, PROB_COLUMNS

STUDY_MODEL_FORMAT = "rsna19-study-model"
STUDY_MODEL_VERSION = 1
#: Study scores: name → how the slice probabilities of a study are summarised.
STUDY_SCORES: tuple[str, ...] = ("max", "top3_mean")
DEFAULT_SENSITIVITY = 0.95
#: Threshold of a class without a positive OOF study (nothing to choose a sensitivity from).
FALLBACK_THRESHOLD = 0.5
#: Scores are clipped to [_EPS, 1 − _EPS] before the logit, so 0 and 1 stay finite.
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # overflow-free


def study_scores(slices: pd.DataFrame, score: str = "max") -> pd.DataFrame:
    """Per-study scores of every class from per-slice probabilities.

    Args:
        slices: one row a slice with ``study_uid`` and the six ``p_<class>`` columns.
        score: one of :data:`STUDY_SCORES`.

    Returns:
        One row a study (index ``study_uid``, sorted), one column per class (``CLASSES`` names).

    Raises:
        ValueError: an unknown score or missing columns.
    """
    if score not in STUDY_SCORES:
        raise ValueError(f"unknown study score {score!r}; choose from {', '.join(STUDY_SCORES)}")
    missing = [c for c in ("study_uid", *PROB_COLUMNS) if c not in slices.columns]
    if missing:
        raise ValueError(f"study_scores: missing columns {missing}")
    g = slices[["study_uid", *PROB_COLUMNS]].groupby("study_uid", sort=True)
    if score == "max":
        out = g.max()
    else:
        out = g.agg(lambda s: float(np.sort(s.to_numpy(dtype=np.float64))[-3:].mean()))
    out.columns = list(CLASSES)
    return out.astype(np.float64)


def study_labels(slices: pd.DataFrame) -> pd.DataFrame:
    """Study labels: a study is positive for a class when any of its slices is (index ``study_uid``, sorted)."""
    missing = [c for c in ("study_uid", *CLASSES) if c not in slices.columns]
    if missing:
        raise ValueError(f"study_labels: missing columns {missing}")
    return slices[["study_uid", *CLASSES]].groupby("study_uid", sort=True).max().astype(np.float64)


def fit_platt(score: np.ndarray, y: np.ndarray) -> tuple[float, float, bool]:
    """Platt scaling of ``logit(score)`` with Platt's smoothed targets, fitted by scikit-learn.

    A soft target ``t`` is a row of label 1 with weight ``t`` plus a row of label 0 with weight ``1 − t``, so the
    fit is an unpenalised ``LogisticRegression`` (Newton's method) on the doubled rows.

    Args:
        score: (N,) scores in [0, 1].
        y: (N,) 0/1 labels.

    Returns:
        ``(a, b, fitted)``: ``p = sigmoid(a · logit(score) + b)``; ``(1, 0, False)`` when a class has no positive
        or no negative, or when the fitted slope is not positive.
    """
    x = _logit(score)
    y = np.asarray(y, dtype=np.float64)
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    if n_pos == 0 or n_neg == 0:
        return 1.0, 0.0, False
    t = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    rows = np.concatenate([x, x])[:, None]
    labels = np.concatenate([np.ones_like(t), np.zeros_like(t)])
    model = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=100)
    model.fit(rows, labels, sample_weight=np.concatenate([t, 1 - t]))
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    if not (a > 0 and math.isfinite(a) and math.isfinite(b)):
        return 1.0, 0.0, False
    return a, b, True


def apply_platt(score: np.ndarray, a: float, b: float) -> np.ndarray:
    """``sigmoid(a · logit(score) + b)`` element-wise."""
    return _sigmoid(a * _logit(score) + b)


def threshold_for_sensitivity(
    p: np.ndarray, y: np.ndarray, target: float, conformal: bool = False
) -> tuple[float | None, float, float]:
    """The highest threshold whose sensitivity on ``(p, y)`` is at least ``target`` (positive: ``p >= t``).

    Args:
        p: (N,) probabilities; y: (N,) 0/1 labels; target: sensitivity in (0, 1].
        conformal: the highest threshold a *new* positive from the same population passes with probability at
            least ``target``: the ⌈target · (N₊ + 1)⌉-th highest positive instead of the ⌈target · N₊⌉-th (the lowest
            positive when that rank does not exist).

    Returns:
        ``(threshold, sensitivity, specificity)`` at that threshold; ``(None, nan, nan)`` without positives
        (specificity is NaN without negatives).
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64) > 0.5
    pos = np.sort(p[y])[::-1]
    if len(pos) == 0:
        return None, float("nan"), float("nan")
    # ceil with a tolerance: 0.95 · 20 is 19.000000000000004 in floating point and must mean 19.
    k = min(max(math.ceil(target * (len(pos) + int(conformal)) - 1e-9), 1), len(pos))
    thr = float(pos[k - 1])
    sens = float((p[y] >= thr).mean())
    neg = p[~y]
    spec = float((neg < thr).mean()) if len(neg) else float("nan")
    return thr, sens, spec


def threshold_for_specificity(p: np.ndarray, y: np.ndarray, target: float) -> tuple[float | None, float, float]:
    """The lowest threshold whose specificity on ``(p, y)`` is at least ``target`` (positive: ``p >= t``).

    The lowest such threshold flags the most studies, so it has the highest sensitivity of all thresholds that keep
    the specificity. It is the smallest probability in ``p`` above the ⌈target · N₋⌉-th lowest negative one (so
    that at least that many negatives fall below it), or just above that negative when nothing in ``p`` is higher.

    Args:
        p: (N,) probabilities; y: (N,) 0/1 labels; target: specificity in (0, 1].

    Returns:
        ``(threshold, sensitivity, specificity)``; ``(None, nan, nan)`` without negatives (sensitivity is NaN
        without positives).
    """
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64) > 0.5
    neg = np.sort(p[~y])
    if len(neg) == 0:
        return None, float("nan"), float("nan")
    k = min(max(math.ceil(target * len(neg) - 1e-9), 1), len(neg))
    above = p[p > neg[k - 1]]
    thr = float(above.min()) if len(above) else float(np.nextafter(neg[k - 1], np.inf))
    spec = float((neg < thr).mean())
    sens = float((p[y] >= thr).mean()) if y.any() else float("nan")
    return thr, sens, spec


def parse_sensitivity(values: list[str] | None) -> dict[str, float]:
    """Target sensitivities per class from ``["0.9"]`` (every class) and/or ``["any=0.95", "subdural=0.8"]``.

    A bare value sets every class; ``CLASS=value`` sets one class and wins over a bare value, whatever the order.

    Returns:
        class → target, every class present (default :data:`DEFAULT_SENSITIVITY`).

    Raises:
        ValueError: an unknown class or a value outside (0, 1].
    """
    default: float = DEFAULT_SENSITIVITY
    named: dict[str, float] = {}
    for item in values or []:
        name, _, val = item.rpartition("=")
        try:
            v = float(val)
        except ValueError:
            raise ValueError(f"sensitivity {item!r}: not a number (expected 0.95 or CLASS=0.95)") from None
        if not 0 < v <= 1:
            raise ValueError(f"sensitivity {item!r}: must be in (0, 1]")
        if not name:
            default = v
        elif name in CLASSES:
            named[name] = v
        else:
            raise ValueError(f"sensitivity {item!r}: unknown class {name!r}; classes are {', '.join(CLASSES)}")
    return dict.fromkeys(CLASSES, default) | named


def fit_study_model(
    slices: pd.DataFrame,
    sensitivity: dict[str, float] | None = None,
    score: str = "max",
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit the study model (calibration + operating points) on OOF slice predictions.

    Args:
        slices: OOF slices: ``study_uid``, ``p_<class>`` ×6 and the six label columns (0/1).
        sensitivity: class → target sensitivity (missing classes: :data:`DEFAULT_SENSITIVITY`).
        score: the study score, one of :data:`STUDY_SCORES`.
        source: what the OOF rows are (stack name, method, ...), stored as is.

    Returns:
        The JSON-able study model (``study_model.json`` in docs/contracts.md).

    Raises:
        ValueError: missing columns, labels that are not 0/1, or non-finite probabilities.
    """
    targets = dict.fromkeys(CLASSES, DEFAULT_SENSITIVITY) | dict(sensitivity or {})
    probs = slices[list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    if not np.isfinite(probs).all():
        raise ValueError("fit_study_model: probabilities must be finite")
    labels = slices[list(CLASSES)].to_numpy(dtype=np.float64)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("fit_study_model: labels must be 0 or 1 (no missing labels)")
    scores = study_scores(slices, score)
    ys = study_labels(slices).loc[scores.index]
    classes = fit_study_classes(scores, ys, targets)
    for i, c in enumerate(CLASSES):
        s_thr, s_sens, s_spec = threshold_for_sensitivity(probs[:, i], labels[:, i], targets[c])
        classes[c] |= {
            "slice_threshold": s_thr if s_thr is not None else FALLBACK_THRESHOLD,
            "slice_oof_sensitivity": _num(s_sens),
            "slice_oof_specificity": _num(s_spec),
        }
    return {
        "format": STUDY_MODEL_FORMAT,
        "version": STUDY_MODEL_VERSION,
        "method": "platt",
        "score": score,
        "n_studies": len(scores),
        "n_slices": len(slices),
        "source": dict(source or {}),
        "classes": classes,
    }


def fit_study_class(score: np.ndarray, y: np.ndarray, target: float) -> dict[str, Any]:
    """Platt calibration and operating point of one class from study scores and study labels.

    Args:
        score: (N,) study scores in [0, 1]; y: (N,) 0/1 study labels; target: sensitivity of the operating point.

    Returns:
        The study-level fields of a class entry of ``study_model.json`` (``a, b, fitted, n_pos, n_neg,
        target_sensitivity, threshold, threshold_chosen, score_threshold, oof_sensitivity, oof_specificity``).
    """
    s, y = np.asarray(score, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b, fitted = fit_platt(s, y)
    p_cal = apply_platt(s, a, b)
    thr, sens, spec = threshold_for_sensitivity(p_cal, y, target, conformal=True)
    return {
        "a": a,
        "b": b,
        "fitted": fitted,
        "n_pos": int(y.sum()),
        "n_neg": int(len(y) - y.sum()),
        "target_sensitivity": float(target),
        "threshold": thr if thr is not None else FALLBACK_THRESHOLD,
        "threshold_chosen": thr is not None,
        # The same operating point on the score scale (the old max-probability fields), for reading.
        "score_threshold": float(s[p_cal >= thr].min()) if thr is not None else None,
        "oof_sensitivity": _num(sens),
        "oof_specificity": _num(spec),
    }


def fit_study_classes(
    scores: pd.DataFrame, labels: pd.DataFrame, targets: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """:func:`fit_study_class` for every class: ``scores`` and ``labels`` are one row a study, ``CLASSES`` columns."""
    return {c: fit_study_class(scores[c].to_numpy(), labels[c].to_numpy(), targets[c]) for c in CLASSES}


def _num(v: float) -> float | None:
    """JSON has no NaN: None instead."""
    return None if not math.isfinite(v) else float(v)


def check_study_model(model: Any, where: str = "study model") -> dict[str, Any]:
    """Validate a loaded study model (types and finite numbers); returns it.

    Raises:
        ValueError: naming ``where`` and the first problem.
    """
    if not isinstance(model, dict) or model.get("format") != STUDY_MODEL_FORMAT:
        raise ValueError(f"{where}: not an rsna19 study model")
    if model.get("version") != STUDY_MODEL_VERSION:
        raise ValueError(f"{where}: study model version {model.get('version')!r}, expected {STUDY_MODEL_VERSION}")
    if model.get("score") not in STUDY_SCORES or model.get("method") != "platt":
        raise ValueError(f"{where}: unknown score {model.get('score')!r} or method {model.get('method')!r}")
    classes = model.get("classes")
    if not isinstance(classes, dict) or set(classes) != set(CLASSES):
        raise ValueError(f"{where}: classes must be exactly {', '.join(CLASSES)}")
    for c, e in classes.items():
        for key in ("a", "b", "threshold", "slice_threshold", "target_sensitivity"):
            v = e.get(key) if isinstance(e, dict) else None
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{where}: {c}.{key} must be a finite number, got {v!r}")
        if not 0 <= e["threshold"] <= 1 or not 0 <= e["slice_threshold"] <= 1:
            raise ValueError(f"{where}: {c}: thresholds must be in [0, 1]")
    return model


def apply_study_model(
    model: dict[str, Any], slices: pd.DataFrame, fold_slices: Sequence[pd.DataFrame] = ()
) -> dict[str, Any]:
    """The calibrated result of one study from its slices' probabilities.

    The operating points were fitted on out-of-fold studies, each scored by one fold's models. A new study is
    predicted by every fold, and the maximum of the fold-averaged probabilities sits lower than one fold's maximum
    wherever the folds disagree on which slice is the worst (demo bundles: the median positive study's score fell
    from 0.92 out of fold to 0.75 on the test studies, and the sensitivity at the 0.95 operating point to 0.71).
    With ``fold_slices`` the study score is therefore the mean over the folds of each fold's own study score, which
    is distributed like the scores the operating points were fitted on.

    Args:
        model: a study model (:func:`fit_study_model`).
        slices: the study's slices (``p_<class>`` columns; ``study_uid`` is not needed).
        fold_slices: the same slices as each bundled fold predicts them alone; empty: score ``slices``.

    Returns:
        ``{"score": name, "method": "platt", "folds": n (0: the fold-averaged slices were scored), "flag":
        "positive"|"negative", "positive_classes": [...], "subtype_rule", "subtypes_withheld": [...], "classes":
        {class: {"score", "probability", "threshold", "target_sensitivity", "above_operating_point",
        "positive"}}}``; the study's ``flag`` is the flag of ``any``. A subtype is ``positive`` only within a positive
        ``any`` (:func:`consistent_flags`): each class has its own operating point, so on a study with ``any``
        negative a subtype can still be over its own; ``above_operating_point`` keeps that raw comparison and
        ``subtypes_withheld`` lists such subtypes.
    """
    frames = list(fold_slices) or [slices]
    scores = pd.concat(
        [study_scores(f[list(PROB_COLUMNS)].assign(study_uid="_"), model["score"]) for f in frames]
    ).mean(axis=0)
    out: dict[str, Any] = {}
    for c in CLASSES:
        e = model["classes"][c]
        p = float(apply_platt(np.array([scores[c]]), e["a"], e["b"])[0])
        out[c] = {
            "score": round(float(scores[c]), 6),
            "probability": round(p, 6),
            "threshold": float(e["threshold"]),
            "target_sensitivity": float(e["target_sensitivity"]),
            "above_operating_point": bool(p >= e["threshold"]),
        }
    flags, withheld = consistent_flags({c: out[c]["above_operating_point"] for c in CLASSES})
    for c in CLASSES:
        out[c]["positive"] = flags[c]
    return {
        "score": model["score"],
        "method": model["method"],
        "folds": len(fold_slices),
        "flag": "positive" if out["any"]["positive"] else "negative",
        "positive_classes": [c for c in CLASSES if out[c]["positive"]],
        "subtype_rule": SUBTYPE_RULE,
        "subtypes_withheld": withheld,
        "classes": out,
    }


#: How the subtype flags follow the flag of ``any`` (recorded in ``study_result`` and in the SR).
SUBTYPE_RULE = "subtypes are reported present only within a positive 'any'"


def consistent_flags(above: dict[str, bool]) -> tuple[dict[str, bool], list[str]]:
    """The reported flags: ``any`` as it is; a subtype only when it is over its operating point and ``any`` is too.

    Args:
        above: class → whether its calibrated probability reaches its own operating point.

    Returns:
        ``(flags, withheld)``: class → reported flag, and the subtypes over their operating points that are not
        reported because ``any`` is negative (in :data:`rsna19.core.constants.CLASSES` order).
    """
    any_positive = bool(above["any"])
    flags = {c: bool(above[c]) and (c == "any" or any_positive) for c in CLASSES}
    withheld = [c for c in CLASSES if c != "any" and above[c] and not any_positive]
    return flags, withheld


def calibrate_frame(model: dict[str, Any], slices: pd.DataFrame) -> pd.DataFrame:
    """Study scores, calibrated probabilities and flags of every study in ``slices`` (for evaluation).

    Returns:
        One row a study (index ``study_uid``): ``score_<class>``, ``p_<class>``, ``flag_<class>`` (bool).
    """
    scores = study_scores(slices, model["score"])
    out = pd.DataFrame(index=scores.index)
    for c in CLASSES:
        e = model["classes"][c]
        out[f"score_{c}"] = scores[c]
        out[f"p_{c}"] = apply_platt(scores[c].to_numpy(), e["a"], e["b"])
        out[f"flag_{c}"] = out[f"p_{c}"] >= e["threshold"]
    return out
