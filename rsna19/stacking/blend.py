"""Blend of the stackers: non-negative weights summing to one, fitted on their level-2 OOF predictions.

The blend's own OOF score stays out-of-fold: for each fold k the weights are fitted on the OOF rows of the other
folds and applied to fold k. The weights used for the test set are fitted on all OOF rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsna19.stacking.convex import combine, fit_convex_weights

#: Blend members that are a base model's own probabilities are named ``base:<model>``.
BASE_PREFIX = "base:"


@dataclass
class BlendResult:
    """Attributes: members (K names), weights (K, 6) fitted on all OOF rows, oof (N, 6), test (N_test, 6)."""

    members: list[str]
    weights: np.ndarray
    oof: np.ndarray
    test: np.ndarray


def fit_blend(
    oof: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    y: np.ndarray,
    folds: np.ndarray,
    per_class: bool = True,
) -> BlendResult:
    """Fit blend weights on OOF predictions, cross-fitted over ``folds`` for an honest OOF score.

    Args:
        oof: member name → (N, 6) level-2 OOF probabilities.
        test: member name → (N_test, 6) test probabilities (same keys).
        y: (N, 6) labels.
        folds: (N,) fold of each row.
        per_class: one weight vector per class, or one shared.
    """
    members = list(oof)
    P = np.stack([oof[m] for m in members], axis=1)  # (N, K, 6)
    out = np.empty((len(y), 6))
    for k in np.unique(folds):
        held = folds == k
        out[held] = combine(P[held], fit_convex_weights(P[~held], y[~held], per_class))
    W = fit_convex_weights(P, y, per_class)
    T = np.stack([test[m] for m in members], axis=1)
    return BlendResult(members, W, out, combine(T, W))
