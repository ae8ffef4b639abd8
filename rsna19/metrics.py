"""The competition metric and its companions (docs/architecture.md, "Metric").

Weighted multi-label log loss: for each slice, ``Σ_c w_c · BCE(y_c, p_c) / Σ_c w_c`` with ``w = 1`` for the
five subtypes and ``2`` for ``any``; averaged over slices; probabilities clipped to ``[1e-15, 1 − 1e-15]``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from rsna19.constants import CLASS_WEIGHTS, CLASSES

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
        y_true: (N, 6) labels in :data:`rsna19.constants.CLASSES` order.
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
