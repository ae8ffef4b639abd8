"""Post-processing of level-2 probabilities: label consistency and clipping."""

from __future__ import annotations

import numpy as np


def postprocess(p: np.ndarray, any_ge_max: bool = True, clip: float = 1e-6) -> np.ndarray:
    """Make ``any`` at least the largest subtype probability and clip to ``[clip, 1 − clip]``.

    A slice with a subtype has a hemorrhage, so ``p_any < max(p_subtype)`` is never right; raising ``any`` can
    only lower the loss of ``any`` on positive slices and costs little on negatives where the subtype was high.

    Args:
        p: (N, 6) probabilities in CLASSES order (``any`` last).
        any_ge_max: apply the consistency rule.
        clip: clipping margin; 0 disables.

    Returns:
        A new (N, 6) float64 array.
    """
    out = np.array(p, dtype=np.float64, copy=True)
    if out.ndim != 2 or out.shape[1] != 6:
        raise ValueError(f"expected (N, 6) probabilities, got {out.shape}")
    if any_ge_max:
        out[:, 5] = np.maximum(out[:, 5], out[:, :5].max(axis=1))
    if clip > 0:
        np.clip(out, clip, 1 - clip, out=out)
    return out
