"""Preview montage of a converted series: windowed slices in a grid, positive labels written on each slice.

The PNG carries no metadata (no time stamps), so the same volume always gives the same bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rsna19.core.constants import CLASSES, SHORT_NAMES, WINDOWS

#: Palette: indices 0..249 are grey levels, then the colours of the text.
_GREYS = 250
_YELLOW, _RED = 250, 251
_PALETTE = [v for i in range(_GREYS) for v in (round(i * 255 / (_GREYS - 1)),) * 3] + [255, 255, 0, 255, 40, 40]


def window_to_uint8(hu: np.ndarray, centre: float, width: float, levels: int = 256) -> np.ndarray:
    """Map HU to 0..levels−1 through a display window (values outside saturate)."""
    lo = centre - width / 2.0
    x = (hu.astype(np.float32) - np.float32(lo)) * np.float32((levels - 1) / width)
    return np.clip(x, 0, levels - 1).astype(np.uint8)


def _pick(z: int, max_tiles: int) -> np.ndarray:
    if z <= max_tiles:
        return np.arange(z)
    return np.unique(np.linspace(0, z - 1, max_tiles).round().astype(np.int64))


def render_preview(
    volume: np.ndarray,
    labels: Mapping[str, np.ndarray] | None = None,
    *,
    window: tuple[float, float] = WINDOWS["brain"],
    tile: int = 96,
    max_tiles: int = 64,
) -> np.ndarray:
    """Draw a montage of the slices of a volume.

    Args:
        volume: (Z, H, W) HU.
        labels: class name → (Z,) 0/1/NaN per slice; positive classes are written in red on their slice.
        window: display (centre, width) in HU.
        tile: side of one slice in the montage (pixels).
        max_tiles: at most this many slices, evenly spaced, are shown.

    Returns:
        (rows·tile, cols·tile, 3) uint8 RGB image.
    """
    return np.asarray(_render(volume, labels, window, tile, max_tiles).convert("RGB"))


def _render(
    volume: np.ndarray,
    labels: Mapping[str, np.ndarray] | None,
    window: tuple[float, float],
    tile: int,
    max_tiles: int,
) -> Image.Image:
    """The montage as a palette image (one byte a pixel: three times less to compress than RGB)."""
    z = int(volume.shape[0])
    picked = _pick(z, max_tiles) if z else np.arange(0)
    n = max(len(picked), 1)
    ncols = int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    canvas = Image.new("P", (ncols * tile, nrows * tile))
    canvas.putpalette(_PALETTE)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default_imagefont()  # Pillow's bundled bitmap font: same pixels everywhere, and fast
    for k, zi in enumerate(picked):
        # Subsample before windowing: the tile is ~3× smaller than the slice, and a preview needs no more.
        step = max(1, min(volume.shape[1], volume.shape[2]) // tile)
        grey = window_to_uint8(volume[zi, ::step, ::step], *window, levels=_GREYS)
        img = Image.fromarray(grey).resize((tile, tile), Image.Resampling.BILINEAR)
        x, y = (k % ncols) * tile, (k // ncols) * tile
        canvas.paste(img, (x, y))
        positive = [SHORT_NAMES.get(c, c) for c in CLASSES if labels is not None and c in labels and labels[c][zi] > 0]
        draw.text((x + 2, y + 1), str(int(zi)), fill=_YELLOW, font=font)
        if positive:
            draw.text((x + 2, y + tile - 12), " ".join(positive), fill=_RED, font=font)
    return canvas


def write_preview(
    volume: np.ndarray,
    labels: Mapping[str, np.ndarray] | None,
    path: str | os.PathLike[str],
    *,
    window: tuple[float, float] = WINDOWS["brain"],
    tile: int = 96,
    max_tiles: int = 64,
) -> None:
    """Render the montage of :func:`render_preview` and write it as a metadata-free palette PNG.

    The PNG holds no time or text chunks, so the same volume always gives the same bytes; fast zlib level 1
    keeps writing it cheap next to decoding the series.
    """
    _render(volume, labels, window, tile, max_tiles).save(path, format="PNG", optimize=False, compress_level=1)
