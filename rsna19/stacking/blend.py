"""Blend of the stackers: non-negative weights summing to one, fitted on their level-2 OOF predictions.

The blend's own OOF score stays out-of-fold: for each fold k the weights are fitted on the OOF rows of the other
folds and applied to fold k. The weights used for the test set are fitted on all OOF rows.

The fallback safeguard: when the cross-fitted blend does not beat its best base-model member on the level-2 OOF
rows, the blend *is* that base model (one-hot weights), so the second level never scores worse than its best input
on OOF. On a few dozen training patients the held-out folds' weights can be noisy enough to lose a few per cent to
the single best model (a synthetic 60-patient run: 1.025x); choosing between two candidates on the same OOF rows is a
small optimism, far smaller than fitting K weights there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsna19.metrics import weighted_log_loss
from rsna19.stacking.convex import combine, fit_convex_weights

#: Blend members that are a base model's own probabilities are named ``base:<model>``.
BASE_PREFIX = "base:"


@dataclass
class BlendResult:
    """Attributes: members (K names), weights (K, 6) fitted on all OOF rows, oof (N, 6), test (N_test, 6);
    fallback: the base-model member the blend fell back on (its weights one-hot), or None."""

    members: list[str]
    weights: np.ndarray
    oof: np.ndarray
    test: np.ndarray
    fallback: str | None = None


def fit_blend(
    oof: dict[str, np.ndarray],
    test: dict[str, np.ndarray],
    y: np.ndarray,
    folds: np.ndarray,
    per_class: bool = True,
    fallback: bool = False,
) -> BlendResult:
    """Fit blend weights on OOF predictions, cross-fitted over ``folds`` for an honest OOF score.

    Args:
        oof: member name → (N, 6) level-2 OOF probabilities.
        test: member name → (N_test, 6) test probabilities (same keys).
        y: (N, 6) labels.
        folds: (N,) fold of each row.
        per_class: one weight vector per class, or one shared.
        fallback: when the cross-fitted blend's weighted log loss is not below its best ``base:<model>`` member's,
            return that member instead (one-hot weights, its own OOF and test probabilities).
    """
    members = list(oof)
    P = np.stack([oof[m] for m in members], axis=1)  # (N, K, 6)
    out = np.empty((len(y), 6))
    for k in np.unique(folds):
        held = folds == k
        out[held] = combine(P[held], fit_convex_weights(P[~held], y[~held], per_class))
    W = fit_convex_weights(P, y, per_class)
    T = np.stack([test[m] for m in members], axis=1)
    if fallback:
        base = [m for m in members if m.startswith(BASE_PREFIX)]
        if base:
            best = min(base, key=lambda m: weighted_log_loss(y, oof[m]))
            if weighted_log_loss(y, oof[best]) <= weighted_log_loss(y, out):
                one_hot = np.zeros_like(W)
                one_hot[members.index(best)] = 1.0
                return BlendResult(members, one_hot, np.asarray(oof[best], np.float64), combine(T, one_hot), best)
    return BlendResult(members, W, out, combine(T, W))
