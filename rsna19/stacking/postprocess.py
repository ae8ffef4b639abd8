"""Post-processing of level-2 probabilities: label consistency and clipping, each step kept only where it helps.

The steps run in :data:`STEPS` order. ``any_ge_max`` raises ``any`` to at least the largest subtype probability (a
slice with a subtype has a hemorrhage); ``clip`` clips to ``[clip, 1 − clip]``. Neither is free: when a model's
subtype heads are noisier than its ``any`` head, ``any_ge_max`` copies their false positives into ``any`` (a
full-size RSNA-shaped run: the ``any`` loss went 0.1052 → 0.1267). So each step is fitted like a stacker on the
level-2 OOF rows of the output it would change (:func:`fit_postprocess`) and kept only when it lowers their
weighted log loss; the kept steps are applied to that output's test rows and recorded (``scores.csv``,
``weights.json``, bundles). The choice of at most two switches on the OOF rows they are scored on is a small
optimism, the same as the blend's fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsna19.core.metrics import weighted_log_loss

#: Post-processing steps, in the order they are tried and applied.
STEPS: tuple[str, ...] = ("any_ge_max", "clip")


def postprocess(p: np.ndarray, any_ge_max: bool = True, clip: float = 1e-6) -> np.ndarray:
    """Make ``any`` at least the largest subtype probability and clip to ``[clip, 1 − clip]``.

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


@dataclass
class PostprocessFit:
    """Which post-processing steps one output keeps, and what each did to its level-2 OOF loss.

    Attributes:
        kept: step → applied (a step the config disables is False).
        effect: step → change of the OOF weighted log loss when the step is added to the steps kept before it
            (negative: it helps); NaN for a step the config disables.
        clip: the clipping margin of the ``clip`` step.
        loss_raw: OOF weighted log loss before post-processing; loss: after the kept steps.
    """

    kept: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(STEPS, False))
    effect: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STEPS, float("nan")))
    clip: float = 0.0
    loss_raw: float = float("nan")
    loss: float = float("nan")

    def apply(self, p: np.ndarray) -> np.ndarray:
        """(N, 6) probabilities with the kept steps applied (a new float64 array)."""
        return postprocess(p, self.kept["any_ge_max"], self.clip if self.kept["clip"] else 0.0)

    @property
    def label(self) -> str:
        """The kept steps joined by ``+``, or ``none``."""
        return "+".join(s for s in STEPS if self.kept[s]) or "none"

    def to_json(self) -> dict[str, Any]:
        """``{"any_ge_max": bool, "clip": margin or 0}``: what :func:`postprocess` needs (bundles, weights.json)."""
        return {"any_ge_max": bool(self.kept["any_ge_max"]), "clip": float(self.clip) if self.kept["clip"] else 0.0}


def fit_postprocess(p_oof: np.ndarray, y: np.ndarray, any_ge_max: bool = True, clip: float = 1e-6) -> PostprocessFit:
    """Choose the post-processing steps of one output on its level-2 OOF rows.

    Each step the config enables is tried on top of the steps kept so far and kept only when it lowers the OOF
    weighted log loss (a step that changes nothing is not kept).

    Args:
        p_oof: (N, 6) level-2 OOF probabilities of the output.
        y: (N, 6) labels.
        any_ge_max: the config enables the consistency step.
        clip: the config's clipping margin (0: disabled).

    Returns:
        The decision, with each step's effect on the OOF loss.
    """
    fit = PostprocessFit(clip=float(clip))
    current = np.asarray(p_oof, dtype=np.float64)
    fit.loss_raw = fit.loss = weighted_log_loss(y, current)
    enabled = {"any_ge_max": bool(any_ge_max), "clip": clip > 0}
    for step in STEPS:
        if not enabled[step]:
            continue
        tried = postprocess(current, any_ge_max=step == "any_ge_max", clip=clip if step == "clip" else 0.0)
        loss = weighted_log_loss(y, tried)
        fit.effect[step] = loss - fit.loss
        if loss < fit.loss:
            fit.kept[step], fit.loss, current = True, loss, tried
    return fit
