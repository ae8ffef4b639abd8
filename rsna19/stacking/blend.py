"""Blend of the stackers: non-negative weights summing to one, fitted on their level-2 OOF predictions.

The blend's own OOF score stays out-of-fold: for each fold k the weights are fitted on the OOF rows of the other
folds and applied to fold k. The weights used for the test set are fitted on all OOF rows.

The fallback safeguard: when the blend's final output (after post-processing, :func:`fall_back_to_base`) does not
beat its best base-model member on the level-2 OOF rows, the blend *is* that base model (one-hot weights), so the
second level never scores worse than its best input on OOF. On a few dozen training patients the held-out folds'
weights can be noisy enough to lose a few per cent to the single best model (a synthetic 60-patient run: 1.025x);
choosing between two candidates on the same OOF rows is a small optimism, far smaller than fitting K weights there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rsna19.core.metrics import weighted_log_loss
from rsna19.stacking.convex import combine, fit_convex_weights

#: Blend members that are a base model's own probabilities are named ``base:<model>``.
BASE_PREFIX = "base:"


@dataclass
class BlendResult:
    """Attributes: members (K names), weights (K, 6) fitted on all OOF rows, oof (N, 6), test (N_test, 6);
    fallback: the base-model member the blend fell back on (its weights one-hot), or None; postprocess: the
    post-processing steps kept for the final output (:class:`rsna19.stacking.postprocess.PostprocessFit`), or
    None before they are chosen."""

    members: list[str]
    weights: np.ndarray
    oof: np.ndarray
    test: np.ndarray
    fallback: str | None = None
    postprocess: Any = None


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
    result = BlendResult(members, W, out, combine(T, W))
    return fall_back_to_base(result, oof, test, y, out) if fallback else result


def best_base_member(oof: dict[str, np.ndarray], y: np.ndarray) -> str | None:
    """The ``base:<model>`` member with the lowest OOF weighted log loss, or None when there is none."""
    base = [m for m in oof if m.startswith(BASE_PREFIX)]
    return min(base, key=lambda m: weighted_log_loss(y, oof[m])) if base else None


def fall_back_to_base(
    result: BlendResult, oof: dict[str, np.ndarray], test: dict[str, np.ndarray], y: np.ndarray, final_oof: np.ndarray
) -> BlendResult:
    """The blend, or its best ``base:<model>`` member when the blend's final OOF output does not beat it.

    Args:
        result: the fitted blend.
        oof, test: member name → (N, 6) / (N_test, 6) probabilities (the blend's inputs).
        y: (N, 6) labels.
        final_oof: (N, 6) the blend's OOF output as it will be written (after post-processing): the fallback
            judges the final output, not an intermediate one.

    Returns:
        ``result`` unchanged, or a result with one-hot weights and the base member's own probabilities
        (``fallback`` names it).
    """
    best = best_base_member(oof, y)
    if best is None or weighted_log_loss(y, oof[best]) > weighted_log_loss(y, final_oof):
        return result
    one_hot = np.zeros_like(result.weights)
    one_hot[result.members.index(best)] = 1.0
    T = np.stack([test[m] for m in result.members], axis=1)
    return BlendResult(result.members, one_hot, np.asarray(oof[best], np.float64), combine(T, one_hot), best)
