"""The seed's baseline: a convex combination of the base models' probabilities, fitted on OOF.

Weights are non-negative and sum to one (per class, or one vector shared by all classes). The loss of a convex
combination of probabilities is convex in the weights, so SLSQP from uniform weights finds the optimum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize

from rsna19.core.constants import CLASS_WEIGHTS
from rsna19.core.errors import UserError
from rsna19.stacking.base import Reader, read_json, save_json
from rsna19.stacking.config import ConvexConfig
from rsna19.stacking.features import Level2Data
from rsna19.stacking.registry import register_stacker

_EPS = 1e-7


def fit_simplex_weights(P: np.ndarray, Y: np.ndarray, class_weights: np.ndarray | None = None) -> np.ndarray:
    """Weights on the simplex minimising the class-weighted log loss of ``Σ_k w_k P[:, k]``.

    Args:
        P: (N, K, C) probabilities of K members for C classes.
        Y: (N, C) labels.
        class_weights: (C,) weights of the classes in the loss (default: all ones).

    Returns:
        (K,) non-negative weights summing to one.
    """
    P = np.asarray(P, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    n, k, c = P.shape
    if k == 1:
        return np.ones(1)
    cw = np.ones(c) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    scale = cw / cw.sum() / n

    def loss_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        q = np.clip(np.einsum("nkc,k->nc", P, w), _EPS, 1 - _EPS)
        loss = -(scale * (Y * np.log(q) + (1 - Y) * np.log1p(-q))).sum()
        dq = scale * (q - Y) / (q * (1 - q))
        return float(loss), np.einsum("nkc,nc->k", P, dq)

    res = minimize(
        loss_and_grad,
        np.full(k, 1.0 / k),
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * k,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    w = np.clip(res.x, 0.0, None)
    return w / w.sum()


def fit_convex_weights(P: np.ndarray, Y: np.ndarray, per_class: bool = True) -> np.ndarray:
    """Convex weights of K members, per class or shared.

    Args:
        P: (N, K, 6) member probabilities.
        Y: (N, 6) labels.
        per_class: fit one weight vector per class; otherwise one vector for all, under the competition weights.

    Returns:
        (K, 6) weights; each column is non-negative and sums to one.
    """
    if per_class:
        return np.stack([fit_simplex_weights(P[:, :, [c]], Y[:, [c]]) for c in range(P.shape[2])], axis=1)
    w = fit_simplex_weights(P, Y, np.asarray(CLASS_WEIGHTS))
    return np.repeat(w[:, None], P.shape[2], axis=1)


def combine(P: np.ndarray, W: np.ndarray) -> np.ndarray:
    """Apply (K, 6) weights to (N, K, 6) member probabilities → (N, 6)."""
    return np.einsum("nkc,kc->nc", np.asarray(P, dtype=np.float64), W)


@register_stacker("convex", config=ConvexConfig)
class ConvexStacker:
    """Level-2 baseline over the base models' own probabilities (``Level2Data.base``)."""

    name = "convex"

    @classmethod
    def from_config(cls, cfg: ConvexConfig, seed: int = 0) -> ConvexStacker:
        """From the ``convex:`` section (the fit is deterministic; ``seed`` is unused)."""
        return cls(cfg.per_class)

    def __init__(self, per_class: bool = True) -> None:
        self.per_class = per_class
        self.weights: np.ndarray | None = None  # (M, 6)

    def fit(self, data: Level2Data, y: np.ndarray) -> None:
        self.weights = fit_convex_weights(data.base, y, self.per_class)

    def predict(self, data: Level2Data) -> np.ndarray:
        if self.weights is None:
            raise RuntimeError("ConvexStacker.predict before fit")
        return combine(data.base, self.weights)

    def save(self, dest: Path) -> dict[str, Any]:
        """Write ``convex.json`` (per_class, (M, 6) weights) into ``dest``."""
        if self.weights is None:
            raise RuntimeError("ConvexStacker.save before fit")
        save_json({"per_class": self.per_class, "weights": np.asarray(self.weights).tolist()}, dest / "convex.json")
        return {"file": "convex.json"}

    @classmethod
    def load(cls, info: dict[str, Any], read: Reader) -> ConvexStacker:
        """The stacker :meth:`save` wrote."""
        c = read_json(read, info["file"])
        st = cls(bool(c["per_class"]))
        st.weights = np.asarray(c["weights"], dtype=np.float64)
        if st.weights.ndim != 2 or st.weights.shape[1] != 6:
            raise UserError(f"stacker file {info['file']}: weights of shape {st.weights.shape}, expected (M, 6)")
        return st
