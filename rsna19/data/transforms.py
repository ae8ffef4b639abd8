"""Map Hounsfield units to the float channels a network sees (docs/architecture.md, "Model inputs").

A *HU mapping* turns an HU array of any shape ``(...)`` into ``(..., C)`` float32 channels. Two kinds:

* :class:`Window` — one CT window (centre/width) scaled to ``[0, 1]``; :class:`MultiWindow` stacks several.
* :class:`CdfMapping` — a monotone piecewise-linear map of HU to ``[-1, 1]`` fitted to the empirical CDF of
  the training voxels in ``[-400, 1000]`` HU (seed 002), so every grey level is used equally often.

Mappings are small, picklable and carry their state as a plain dict (:meth:`state`), which goes into
checkpoints so prediction uses exactly the mapping the model was trained with.

Images can also be emitted as **uint8** (``data.image_dtype: uint8``): every channel's output range is scaled to
0…255 (a window's ``[0, 1]``, the CDF map's ``[-1, 1]``) and rounded. That is 4× less memory to write, collate and
send to the GPU, where :func:`decode_image` turns the batch into float ``[0, 1]`` channels (so a CDF channel reads
``[0, 1]`` there, not ``[-1, 1]``: the first convolution absorbs the difference). A window 80 HU wide is
quantised to 0.3 HU, finer than the integer HU of the cache; the 2800 HU bone window to 11 HU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rsna19.core.constants import WINDOWS
from rsna19.core.cv2_threads import cv2
from rsna19.core.errors import UserError

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
        """Window from :data:`rsna19.core.constants.WINDOWS` (``brain``, ``subdural``, ``bone``, ``soft``)."""
        if name not in WINDOWS:
            raise UserError(f"unknown window {name!r}; known: {', '.join([*WINDOWS, CDF])}")
        return cls(*WINDOWS[name])

    def __call__(self, hu: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Map ``hu`` (any shape, any numeric dtype) to float32 in ``[0, 1]`` of the same shape.

        Args:
            hu: HU values.
            out: optional array of ``hu``'s shape to write into (saves a copy in the loader): float32 for
                ``[0, 1]``, or uint8 for ``round(255 · value)``.
        """
        hu = np.asarray(hu)
        if out is None:
            out = np.empty(hu.shape, dtype=np.float32)
        if hu.ndim >= 2 and hu.dtype in _CV_DTYPES:
            # OpenCV's SIMD kernels are ~4x faster than the numpy expression; they work on 2-D planes.
            for i in np.ndindex(hu.shape[:-2]):
                self.map_image(hu[i], out[i])
            return out
        return self._numpy(hu, out, *self._affine(out.dtype))

    def map_image(self, img: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Map one OpenCV image in one call: (H, W) or (H, W, k ≤ 4) interleaved slices, elementwise.

        Args:
            img: HU, float32 / int16 / uint16 / uint8.
            out: float32 or uint8 array of ``img``'s shape (written in place when C-contiguous).
        """
        scale, shift = self._affine(out.dtype)
        if img.dtype not in _CV_DTYPES:
            return self._numpy(img, out, scale, shift)
        if out.dtype == np.uint8:
            if img.dtype != np.float32:  # OpenCV has no SIMD path from int16 straight to 8 bits
                img = img.astype(np.float32)
            # One pass: the saturating cast to 8 bits is the window's clip (and rounds to nearest).
            res = cv2.addWeighted(img, scale, img, 0.0, shift, dtype=cv2.CV_8U, dst=self._dst(out))
        else:
            res = cv2.addWeighted(img, scale, img, 0.0, shift, dtype=cv2.CV_32F, dst=self._dst(out))
            cv2.threshold(res, 1.0, 1.0, cv2.THRESH_TRUNC, dst=res)  # min(x, 1)
            cv2.threshold(res, 0.0, 0.0, cv2.THRESH_TOZERO, dst=res)  # max(x, 0)
        if res is not out:
            out[...] = res
        return out

    @staticmethod
    def _dst(out: np.ndarray) -> np.ndarray | None:
        # OpenCV writes in place only into a contiguous array; otherwise it returns a new one.
        return out if out.flags.c_contiguous else None

    def _affine(self, dtype: np.dtype) -> tuple[float, float]:
        """(scale, shift) of the map ``hu · scale + shift`` for an output of ``dtype`` (uint8: 255 · value)."""
        scale = 1.0 / self.width
        shift = -(self.centre - self.width / 2) * scale
        return (255.0 * scale, 255.0 * shift) if dtype == np.uint8 else (scale, shift)

    @staticmethod
    def _numpy(hu: np.ndarray, out: np.ndarray, scale: float, shift: float) -> np.ndarray:
        if out.dtype == np.uint8:
            v = np.asarray(hu, dtype=np.float32) * np.float32(scale) + np.float32(shift)
            out[...] = np.rint(np.clip(v, 0.0, 255.0))
            return out
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
        """Map ``hu`` (any shape) to float32 in ``[-1, 1]`` of the same shape (written into ``out`` if given).

        A uint8 ``out`` receives ``round(127.5 · (value + 1))``.
        """
        flat = np.asarray(hu, dtype=np.float32).ravel()
        mapped = np.interp(flat, self.knots_hu, self.knots_out).astype(np.float32).reshape(np.shape(hu))
        if out is None:
            return mapped
        if out.dtype == np.uint8:
            out[...] = np.rint((mapped + 1.0) * 127.5)
            return out
        out[...] = mapped
        return out

    def map_image(self, img: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Map one image of any layout into ``out`` (elementwise, as :meth:`__call__`)."""
        return self(img, out=out)

    def state(self) -> dict[str, list[float]]:
        """Knots as plain lists (checkpoint-safe)."""
        return {"knots_hu": self.knots_hu.tolist(), "knots_out": self.knots_out.tolist()}

    def __repr__(self) -> str:
        return f"CdfMapping(knots={len(self.knots_hu)}, hu=[{self.knots_hu[0]:g}, {self.knots_hu[-1]:g}])"


class MultiWindow:
    """Several windows (and optionally the CDF mapping) as channels.

    Args:
        names: window names from :data:`rsna19.core.constants.WINDOWS` or ``"cdf"``.
        cdf: the CDF mapping used for a ``"cdf"`` entry; defaults to :meth:`CdfMapping.linear`.
        reference_hu: with a number, the datasets shift each series' HU so that its brain parenchyma reads this
            value before the windows (``data.hu_reference: brain``, :mod:`rsna19.data.reference`); None: absolute
            HU. It is part of :meth:`state`, so prediction feeds a model what it was trained on.
        smooth_px: σ of a Gaussian applied to each (H, W) HU slice before the windows, in pixels of the image the
            network sees (``data.smooth_px``; 0: none). It sets a floor under the image's resolution, so
            reconstruction kernels and doses that differ in fine detail and noise reach the network alike (an
            unsharp mask integrates to zero, so its edge overshoot averages out under a wider blur). Part of
            :meth:`state`, as ``reference_hu``.

    Example:
        >>> mw = MultiWindow(["brain", "subdural", "bone"])
        >>> mw(np.zeros((5, 64, 64), np.int16)).shape
        (5, 3, 64, 64)
    """

    def __init__(
        self,
        names: Sequence[str],
        cdf: CdfMapping | None = None,
        reference_hu: float | None = None,
        smooth_px: float = 0.0,
    ) -> None:
        if not names:
            raise UserError("at least one window is needed")
        if not (smooth_px >= 0.0 and np.isfinite(smooth_px)):
            raise UserError(f"data.smooth_px must be a finite σ >= 0 (pixels), got {smooth_px}")
        self.names = list(names)
        self.reference_hu = None if reference_hu is None else float(reference_hu)
        self.smooth_px = float(smooth_px)
        self.cdf = cdf if cdf is not None else CdfMapping.linear()
        self.maps = [self.cdf if n == CDF else Window.named(n) for n in self.names]

    @property
    def n_channels(self) -> int:
        """Number of output channels per slice."""
        return len(self.maps)

    def __call__(
        self, hu: np.ndarray, axis: int = -3, dtype: str | np.dtype = "float32", out: np.ndarray | None = None
    ) -> np.ndarray:
        """Map HU to windows inserted as a new axis.

        Args:
            hu: HU array, e.g. (S, H, W).
            axis: where the window axis goes in the output (default: before H, W → (S, C, H, W)).
            dtype: ``float32`` (each mapping's range) or ``uint8`` (that range scaled to 0…255, see the module).
            out: optional array to write into (its dtype wins over ``dtype``).

        Returns:
            array of ``dtype`` with one more axis of length :attr:`n_channels`.
        """
        axis = axis % (np.ndim(hu) + 1)
        hu = self.smoothed(hu)
        shape = list(np.shape(hu))
        shape.insert(axis, self.n_channels)
        if out is None:
            out = np.empty(shape, dtype=parse_image_dtype(dtype))
        elif list(out.shape) != shape:
            raise ValueError(f"out has shape {out.shape}, expected {tuple(shape)}")
        for c, m in enumerate(self.maps):
            # Each window writes straight into its slot of the output: no per-window temporaries.
            m(hu, out=out[(slice(None),) * axis + (c,)])
        return out

    def smoothed(self, hu: np.ndarray, in_place: bool = False) -> np.ndarray:
        """``hu`` (..., H, W) with each (H, W) plane blurred by :attr:`smooth_px` (``hu`` itself when that is 0).

        Args:
            hu: HU array whose last two axes are a slice.
            in_place: write into ``hu`` (a float32 array the caller owns) instead of a new float32 array.
        """
        if self.smooth_px == 0.0 or np.ndim(hu) < 2:
            return hu
        src = np.asarray(hu, dtype=np.float32)
        # In place only on a contiguous buffer: the per-plane reshape of a strided view would be a copy.
        out = src if in_place and src is hu and src.flags.c_contiguous else np.empty_like(src)
        planes_in, planes_out = src.reshape(-1, *src.shape[-2:]), out.reshape(-1, *src.shape[-2:])
        for p_in, p_out in zip(planes_in, planes_out):
            # Replicated borders: the crop's edge is air or head, not a dark frame that would bleed inwards.
            cv2.GaussianBlur(p_in, (0, 0), self.smooth_px, dst=p_out, borderType=cv2.BORDER_REPLICATE)
        return out

    def map_slice(self, hu: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Map one (H, W) HU slice into ``out`` (C, H, W), float32 or uint8: the loader's per-slice path.

        With :attr:`smooth_px` the slice is blurred first, in place when it is float32 (the loader's own buffer).
        """
        hu = self.smoothed(hu, in_place=True)
        for c, m in enumerate(self.maps):
            m.map_image(hu, out[c])
        return out

    def state(self) -> dict[str, Any]:
        """Plain-dict state: window names, CDF knots, the brain reference (None: absolute HU) and the blur."""
        return {
            "names": self.names,
            "cdf": self.cdf.state(),
            "reference_hu": self.reference_hu,
            "smooth_px": self.smooth_px,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MultiWindow:
        """Rebuild from :meth:`state` (a state written before ``reference_hu`` or ``smooth_px`` existed reads
        absolute HU, no blur)."""
        cdf = CdfMapping(**state["cdf"]) if state.get("cdf") else None
        return cls(
            state["names"],
            cdf=cdf,
            reference_hu=state.get("reference_hu"),
            smooth_px=float(state.get("smooth_px") or 0.0),
        )

    def __repr__(self) -> str:
        ref = "" if self.reference_hu is None else f", reference_hu={self.reference_hu:g}"
        blur = f", smooth_px={self.smooth_px:g}" if self.smooth_px else ""
        return f"MultiWindow({self.names}{ref}{blur})"


#: Image dtypes a dataset can emit (``data.image_dtype``).
IMAGE_DTYPES: tuple[str, ...] = ("float32", "uint8")


def parse_image_dtype(name: str | np.dtype) -> np.dtype:
    """The numpy dtype of ``data.image_dtype``.

    Raises:
        UserError: not one of :data:`IMAGE_DTYPES`.
    """
    dt = np.dtype(name)
    if dt.name not in IMAGE_DTYPES:
        raise UserError(f"data.image_dtype must be one of {', '.join(IMAGE_DTYPES)}, got {name!r}")
    return dt


def decode_image(x: torch.Tensor) -> torch.Tensor:
    """A batch of images as float: uint8 (from ``image_dtype: uint8``) → ``x / 255``; float passes unchanged.

    Call it on the device (after ``.to(device)``): the 4× smaller uint8 tensor is what crosses from the loader.

    Args:
        x: images of any shape, e.g. (B, C, H, W).
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float32).mul_(1.0 / 255.0)
    return x
