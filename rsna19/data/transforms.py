"""Map Hounsfield units to the float channels a network sees (DESIGN §4).

A *HU mapping* turns an HU array of any shape ``(...)`` into ``(..., C)`` float32 channels. Two kinds:

* :class:`Window` — one CT window (centre/width) scaled to ``[0, 1]``; :class:`MultiWindow` stacks several.
* :class:`CdfMapping` — a monotone piecewise-linear map of HU to ``[-1, 1]`` fitted to the empirical CDF of
  the training voxels in ``[-400, 1000]`` HU (seed 002), so every grey level is used equally often.

Mappings are small, picklable and carry their state as a plain dict (:meth:`state`), which goes into
checkpoints so prediction uses exactly the mapping the model was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rsna19.constants import WINDOWS
from rsna19.errors import UserError
from rsna19.utils.cv2_threads import cv2

#: Name of the CDF mapping in a ``windows:`` list.
CDF = "cdf"

#: Input dtypes the OpenCV fast path of :class:`Window` accepts.
_CV_DTYPES = (np.dtype(np.float32), np.dtype(np.int16), np.dtype(np.uint8), np.dtype(np.uint16))


class Window:
    """One CT window: ``clip((hu - (centre - width / 2)) / width, 0, 1)``.

    Args:
        centre: window centre in HU.
        width: window width in HU (> 0).
    """

    def __init__(self, centre: float, width: float) -> None:
        if width <= 0:
            raise ValueError(f"window width must be > 0, got {width}")
        self.centre = float(centre)
        self.width = float(width)

    @classmethod
    def named(cls, name: str) -> Window:
        """Window from :data:`rsna19.constants.WINDOWS` (``brain``, ``subdural``, ``bone``, ``soft``)."""
        if name not in WINDOWS:
            raise UserError(f"unknown window {name!r}; known: {', '.join([*WINDOWS, CDF])}")
        return cls(*WINDOWS[name])

    def __call__(self, hu: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Map ``hu`` (any shape, any numeric dtype) to float32 in ``[0, 1]`` of the same shape.

        Args:
            hu: HU values.
            out: optional float32 array of ``hu``'s shape to write into (saves a copy in the loader).
        """
        hu = np.asarray(hu)
        if out is None:
            out = np.empty(hu.shape, dtype=np.float32)
        scale = 1.0 / self.width
        shift = -(self.centre - self.width / 2) * scale
        if hu.ndim >= 2 and hu.dtype in _CV_DTYPES:
            # OpenCV's SIMD kernels are ~4x faster than the numpy expression; they work on 2-D planes, and only
            # write in place into a contiguous one.
            for i in np.ndindex(hu.shape[:-2]):
                if out[i].flags.c_contiguous:
                    plane = out[i]
                    cv2.addWeighted(hu[i], scale, hu[i], 0.0, shift, dst=plane, dtype=cv2.CV_32F)
                    cv2.threshold(plane, 1.0, 1.0, cv2.THRESH_TRUNC, dst=plane)  # min(x, 1)
                    cv2.threshold(plane, 0.0, 0.0, cv2.THRESH_TOZERO, dst=plane)  # max(x, 0)
                else:
                    self._numpy(hu[i], out[i], scale, shift)
            return out
        return self._numpy(hu, out, scale, shift)

    @staticmethod
    def _numpy(hu: np.ndarray, out: np.ndarray, scale: float, shift: float) -> np.ndarray:
        np.multiply(hu, np.float32(scale), out=out, dtype=np.float32)
        out += np.float32(shift)
        np.minimum(out, np.float32(1.0), out=out)
        return np.maximum(out, np.float32(0.0), out=out)

    def __repr__(self) -> str:
        return f"Window(centre={self.centre:g}, width={self.width:g})"


class CdfMapping:
    """Monotone piecewise-linear HU → ``[-1, 1]`` map through the quantiles of the training voxels.

    Args:
        knots_hu: increasing HU values (K,).
        knots_out: their outputs in ``[-1, 1]`` (K,), non-decreasing. HU below/above the ends clamp to them.
    """

    def __init__(self, knots_hu: Sequence[float], knots_out: Sequence[float]) -> None:
        self.knots_hu = np.asarray(knots_hu, dtype=np.float32)
        self.knots_out = np.asarray(knots_out, dtype=np.float32)
        if self.knots_hu.ndim != 1 or self.knots_hu.shape != self.knots_out.shape or len(self.knots_hu) < 2:
            raise ValueError("CdfMapping needs two 1-D knot arrays of equal length >= 2")
        if np.any(np.diff(self.knots_hu) <= 0) or np.any(np.diff(self.knots_out) < 0):
            raise ValueError("CdfMapping knots must be increasing")

    @classmethod
    def linear(cls, lo: float = -400.0, hi: float = 1000.0) -> CdfMapping:
        """The unfitted default: a straight line from ``(lo, -1)`` to ``(hi, 1)``."""
        return cls([lo, hi], [-1.0, 1.0])

    @classmethod
    def fit(cls, hu: np.ndarray, lo: float = -400.0, hi: float = 1000.0, n_knots: int = 65) -> CdfMapping:
        """Fit to the empirical CDF of the voxels of ``hu`` that lie in ``[lo, hi]``.

        Args:
            hu: sample of HU values, any shape.
            lo, hi: HU range of the mapping; values outside clamp to -1 / 1.
            n_knots: number of quantile knots.
        """
        v = np.asarray(hu, dtype=np.float32).ravel()
        v = v[(v >= lo) & (v <= hi)]
        if v.size < n_knots:
            return cls.linear(lo, hi)
        q = np.linspace(0.0, 1.0, n_knots)
        knots = np.quantile(v, q).astype(np.float64)
        knots[0], knots[-1] = lo, hi
        # Quantiles repeat where many voxels share one HU value; keep the knots strictly increasing.
        keep = np.concatenate([[True], np.diff(knots) > 1e-3])
        knots, q = knots[keep], q[keep]
        knots[-1], q[-1] = hi, 1.0
        return cls(knots, 2.0 * q - 1.0)

    def __call__(self, hu: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Map ``hu`` (any shape) to float32 in ``[-1, 1]`` of the same shape (written into ``out`` if given)."""
        flat = np.asarray(hu, dtype=np.float32).ravel()
        mapped = np.interp(flat, self.knots_hu, self.knots_out).astype(np.float32).reshape(np.shape(hu))
        if out is None:
            return mapped
        out[...] = mapped
        return out

    def state(self) -> dict[str, list[float]]:
        """Knots as plain lists (checkpoint-safe)."""
        return {"knots_hu": self.knots_hu.tolist(), "knots_out": self.knots_out.tolist()}

    def __repr__(self) -> str:
        return f"CdfMapping(knots={len(self.knots_hu)}, hu=[{self.knots_hu[0]:g}, {self.knots_hu[-1]:g}])"


class MultiWindow:
    """Several windows (and optionally the CDF mapping) as channels.

    Args:
        names: window names from :data:`rsna19.constants.WINDOWS` or ``"cdf"``.
        cdf: the CDF mapping used for a ``"cdf"`` entry; defaults to :meth:`CdfMapping.linear`.

    Example:
        >>> mw = MultiWindow(["brain", "subdural", "bone"])
        >>> mw(np.zeros((5, 64, 64), np.int16)).shape
        (5, 3, 64, 64)
    """

    def __init__(self, names: Sequence[str], cdf: CdfMapping | None = None) -> None:
        if not names:
            raise UserError("at least one window is needed")
        self.names = list(names)
        self.cdf = cdf if cdf is not None else CdfMapping.linear()
        self.maps = [self.cdf if n == CDF else Window.named(n) for n in self.names]

    @property
    def n_channels(self) -> int:
        """Number of output channels per slice."""
        return len(self.maps)

    def __call__(self, hu: np.ndarray, axis: int = -3) -> np.ndarray:
        """Map HU to windows inserted as a new axis.

        Args:
            hu: HU array, e.g. (S, H, W).
            axis: where the window axis goes in the output (default: before H, W → (S, C, H, W)).

        Returns:
            float32 array with one more axis of length :attr:`n_channels`.
        """
        axis = axis % (np.ndim(hu) + 1)
        shape = list(np.shape(hu))
        shape.insert(axis, self.n_channels)
        out = np.empty(shape, dtype=np.float32)
        for c, m in enumerate(self.maps):
            # Each window writes straight into its slot of the output: no per-window temporaries.
            m(hu, out=out[(slice(None),) * axis + (c,)])
        return out

    def state(self) -> dict[str, Any]:
        """Plain-dict state: window names and CDF knots."""
        return {"names": self.names, "cdf": self.cdf.state()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MultiWindow:
        """Rebuild from :meth:`state`."""
        cdf = CdfMapping(**state["cdf"]) if state.get("cdf") else None
        return cls(state["names"], cdf=cdf)

    def __repr__(self) -> str:
        return f"MultiWindow({self.names})"
