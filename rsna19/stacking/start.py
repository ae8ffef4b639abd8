"""Where the residual stackers start: the convex combination of the base models' own probabilities.

LightGBM boosts from it (``init_score``) and the MLP adds its output to it (a zero-initialised last layer), so a
stacker that early stopping leaves with nothing to add predicts exactly the convex blend of its inputs. On small
data this is the safeguard that keeps the second level from losing to its inputs: the level-2 model only moves
away from the blend as far as the inner validation patients reward it.
"""

from __future__ import annotations

import numpy as np

from rsna19.stacking.convex import combine, fit_convex_weights

#: Starting points a residual stacker knows: ``convex`` (the blend of the base models) or ``prior`` (none).
STARTS: tuple[str, ...] = ("convex", "prior")
_EPS = 1e-6


def fit_start(base: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-class convex weights of the base models.

    Args:
        base: (N, M, 6) base-model probabilities at the slice itself.
        y: (N, 6) labels.

    Returns:
        (M, 6) weights, non-negative, each column summing to one.
    """
    return fit_convex_weights(base, y, per_class=True)


def start_logit(base: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, 6) logit of the weighted base probabilities (clipped to [1e-6, 1 − 1e-6])."""
    p = np.clip(combine(base, weights), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def check_start(start: str) -> str:
    """``start`` itself, or a ValueError naming the valid starts."""
    if start not in STARTS:
        raise ValueError(f"unknown stacker start {start!r}; choose one of {', '.join(STARTS)}")
    return start
