"""Preview montage of a converted series: windowed slices in a grid, positive labels written on each slice.

The PNG carries no metadata (no time stamps), so the same volume always gives the same bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rsna19.constants import CLASSES, WINDOWS

#: Short names drawn on the slices, in CLASSES order.
SHORT_NAMES: dict[str, str] = {
    "epidural": "EDH",
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
    "any": "ANY",
}


def window_to_uint8(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Map HU to 0..255 through a display window (values outside saturate)."""
    lo = centre - width / 2.0
    x = (hu.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / width)
    return np.clip(x, 0, 255).astype(np.uint8)


def _pick(z: int, max_tiles: int) -> np.ndarray:
    if z <= max_tiles:
        return np.arange(z)
    return np.unique(np.linspace(0, z - 1, max_tiles).round().astype(np.int64))


def render_preview(
    volume: np.ndarray,
    labels: Mapping[str, np.ndarray] | None = None,
    *,
    window: tuple[float, float] = WINDOWS["brain"],
    tile: int = 128,
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
    z = int(volume.shape[0])
    picked = _pick(z, max_tiles) if z else np.arange(0)
    n = max(len(picked), 1)
    ncols = int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    canvas = Image.new("RGB", (ncols * tile, nrows * tile))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()  # the bundled font: same pixels everywhere
    for k, zi in enumerate(picked):
        img = Image.fromarray(window_to_uint8(volume[zi], *window)).resize((tile, tile), Image.Resampling.BILINEAR)
        x, y = (k % ncols) * tile, (k // ncols) * tile
        canvas.paste(img.convert("RGB"), (x, y))
        positive = [SHORT_NAMES.get(c, c) for c in CLASSES if labels is not None and c in labels and labels[c][zi] > 0]
        draw.text((x + 2, y + 1), str(int(zi)), fill=(255, 255, 0), font=font)
        if positive:
            draw.text((x + 2, y + tile - 12), " ".join(positive), fill=(255, 40, 40), font=font)
    return np.asarray(canvas)


def save_png(image: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write an (H, W) or (H, W, 3) uint8 image as a metadata-free PNG (deterministic bytes)."""
    Image.fromarray(image).save(path, format="PNG", optimize=False, compress_level=6)
