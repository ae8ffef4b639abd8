"""Cut one output window out of a slice through an axis-aligned map: shift, in-plane scale and crop in one pass.

Output pixel ``(a, b)`` of the window that starts at ``(y0, x0)`` samples the input at
``(row, col) = ((y0 + a)·k_r − s_row, (x0 + b)·k_c − s_col)``, where ``k = output spacing / input spacing`` and
``s`` is the slice's tilt shift. The map is separable, so it is two 1-D gathers (plus a lerp each where the
coordinates are fractional). Untilted, unresampled slices are copied exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Coordinates closer than this to an integer are sampled without interpolation (keeps integer HU exact).
_INTEGER_TOL = 1e-4


@dataclass(frozen=True)
class Window:
    """An output window in the (shift-corrected, resampled) pixel frame.

    Attributes:
        y0, x0: top-left output pixel (may be negative: padded).
        height, width: window size.
        scale: (k_r, k_c) input pixels per output pixel (1, 1 without resampling).
    """

    y0: int
    x0: int
    height: int
    width: int
    scale: tuple[float, float] = (1.0, 1.0)

    @property
    def box(self) -> list[int]:
        """``[y0, x0, y1, x1]`` as written to meta.json."""
        return [self.y0, self.x0, self.y0 + self.height, self.x0 + self.width]


def resampled_shape(
    shape: tuple[int, int], pixel_spacing: tuple[float, float], spacing: float | None
) -> tuple[int, int]:
    """Size of the in-plane frame after resampling (rows, cols) of ``pixel_spacing`` mm to ``spacing`` mm."""
    if spacing is None:
        return int(shape[0]), int(shape[1])
    return (
        max(1, int(round(shape[0] * pixel_spacing[0] / spacing))),
        max(1, int(round(shape[1] * pixel_spacing[1] / spacing))),
    )


def scale_factors(pixel_spacing: tuple[float, float], spacing: float | None) -> tuple[float, float]:
    """Input pixels per output pixel along rows and columns."""
    if spacing is None:
        return 1.0, 1.0
    return float(spacing / pixel_spacing[0]), float(spacing / pixel_spacing[1])


def centred_window(
    centre: tuple[float, float], frame: tuple[int, int], crop: int | None, scale: tuple[float, float]
) -> Window:
    """The ``crop × crop`` window centred on ``centre`` (output frame), or the whole frame where crop is None/0."""
    if not crop:
        return Window(0, 0, int(frame[0]), int(frame[1]), scale)
    half = (crop - 1) / 2.0
    y0 = int(np.floor(centre[0] - half + 0.5))
    x0 = int(np.floor(centre[1] - half + 0.5))
    return Window(y0, x0, int(crop), int(crop), scale)


def _coords(start: int, size: int, scale: float, shift: float) -> np.ndarray:
    return (start + np.arange(size, dtype=np.float64)) * scale - shift


def _is_integer(coords: np.ndarray) -> bool:
    return bool(np.all(np.abs(coords - np.floor(coords + _INTEGER_TOL)) <= _INTEGER_TOL))


def _slice_padded(img: np.ndarray, start: int, size: int, axis: int, pad: float) -> np.ndarray:
    """``img[start:start + size]`` along ``axis``, with ``pad`` where that leaves the image (a copy)."""
    n = img.shape[axis]
    shape = list(img.shape)
    shape[axis] = size
    out = np.full(shape, pad, dtype=img.dtype)
    lo, hi = max(start, 0), min(start + size, n)
    if lo < hi:
        src = [slice(None)] * img.ndim
        dst = [slice(None)] * img.ndim
        src[axis] = slice(lo, hi)
        dst[axis] = slice(lo - start, hi - start)
        out[tuple(dst)] = img[tuple(src)]
    return out


def _gather(img: np.ndarray, coords: np.ndarray, axis: int, order: int, pad: float) -> np.ndarray:
    """Sample ``img`` along ``axis`` at ``coords`` (nearest for order 0, linear for 1); outside → ``pad``."""
    n = img.shape[axis]
    base = np.floor(coords + _INTEGER_TOL)
    frac = coords - base
    integer = np.all(np.abs(frac) <= _INTEGER_TOL)
    if integer and len(coords) > 1 and np.all(np.diff(base) == 1):
        return _slice_padded(img, int(base[0]), len(coords), axis, pad)
    if order == 0 or integer:
        idx = (np.floor(coords + 0.5) if order == 0 and not integer else base).astype(np.int64)
        valid = (idx >= 0) & (idx < n)
        out = np.take(img, np.clip(idx, 0, n - 1), axis=axis)
        if not valid.all():
            sl = [slice(None)] * img.ndim
            sl[axis] = ~valid
            out[tuple(sl)] = pad
        return out
    i0 = base.astype(np.int64)
    i1 = i0 + 1
    v0 = _gather(img, i0.astype(np.float64), axis, 0, pad).astype(np.float32)
    v1 = _gather(img, i1.astype(np.float64), axis, 0, pad).astype(np.float32)
    shape = [1] * img.ndim
    shape[axis] = -1
    # v0 + (v1 − v0)·w, in place: this is the whole cost of a tilted slice.
    v1 -= v0
    v1 *= frac.astype(np.float32).reshape(shape)
    v0 += v1
    return v0


def sample_window(img: np.ndarray, window: Window, shift: tuple[float, float], order: int, pad: float) -> np.ndarray:
    """Cut ``window`` out of one slice moved by ``shift`` (rows, cols; input pixels).

    Args:
        img: (rows, cols) input slice.
        window: output window and scale.
        shift: (s_row, s_col): the corrected slice is the input moved by this many pixels.
        order: 1 linear (images), 0 nearest (masks).
        pad: value outside the input.

    Returns:
        (window.height, window.width) array, the dtype of ``img`` (rounded where interpolated).
    """
    rows = _coords(window.y0, window.height, window.scale[0], shift[0])
    cols = _coords(window.x0, window.width, window.scale[1], shift[1])
    if _is_integer(cols) and not _is_integer(rows):
        # Cut the exact axis first so the interpolation runs on the smaller array (a tilt shifts rows only).
        out = _gather(_gather(img, cols, 1, order, pad), rows, 0, order, pad)
    else:
        out = _gather(_gather(img, rows, 0, order, pad), cols, 1, order, pad)
    if out.dtype != img.dtype:
        out = np.rint(out).astype(img.dtype) if np.issubdtype(img.dtype, np.integer) else out.astype(img.dtype)
    return out


def mass_centre(
    counts: np.ndarray, row_sums: np.ndarray, col_sums: np.ndarray, shifts: np.ndarray, scale: tuple[float, float]
) -> tuple[float, float] | None:
    """Centre of mass of a series' foreground in the output frame, from per-slice input-frame moments.

    Moving a slice by ``s`` moves its centre of mass by ``s``, and the output frame is the input frame divided by
    the scale, so one centre per series comes from per-slice sums without resampling anything.

    Args:
        counts: (Z,) foreground pixels per slice.
        row_sums, col_sums: (Z,) sums of the foreground pixels' row / column indices.
        shifts: (Z, 2) tilt shifts (rows, cols).
        scale: (k_r, k_c).

    Returns:
        (row, col) in the output frame, or None without any foreground.
    """
    total = float(np.sum(counts))
    if total <= 0:
        return None
    cy = (float(np.sum(row_sums)) + float(np.sum(counts * shifts[:, 0]))) / total
    cx = (float(np.sum(col_sums)) + float(np.sum(counts * shifts[:, 1]))) / total
    return cy / scale[0], cx / scale[1]
