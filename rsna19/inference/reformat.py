"""Thin series → slabs of the training slice spacing, and the slab probabilities back onto every thin slice.

The models were trained on slices ~5 mm apart: their 2.5D neighbours, slab windows and the stacker's ±2 offsets
count slices, so on a 0.625 mm series they would see an eighth of the context they learnt from, and a series of
250 slices is far outside the training ``n_slices``. A series whose slice spacing is well under the training
spacing (less than :data:`REFORMAT_RATIO` of it) is therefore averaged, in HU and after the normal conversion
(HU, ordering, tilt correction, in-plane resampling and crop), into contiguous slabs along the slice normal:

* the covered length (first to last position, plus one spacing) is cut into ``round(length / training)`` slabs of
  equal width (≈ the training spacing), using the slice positions in millimetres, not slice counts;
* each thin slice belongs to the slab containing its position; a slab's image is the mean HU of its slices and its
  position the mean of theirs;
* a slab is named after its thin slice nearest to its centre (a real SOP UID of the series).

Mapping back: every thin slice takes the probabilities of the slab containing it (a step function, not an
interpolation): each reported probability is then exactly one the models gave, the study maxima equal the slab
maxima, and a slice is never credited with evidence from a slab it is not part of.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Series whose slice spacing is below this fraction of the training spacing are reformatted.
REFORMAT_RATIO = 0.6


@dataclass
class Slabs:
    """A thin series averaged into slabs.

    Attributes:
        volume: (S, H, W) int16 HU of the slabs.
        meta: the conversion meta of the slab series (``sop_uids``, ``positions``, ``spacing`` of the slabs).
        slab_of: (Z,) int, the slab of each thin slice (thin slices in their converted order).
        width_mm: slab width along the normal.
    """

    volume: np.ndarray
    meta: dict[str, Any]
    slab_of: np.ndarray
    width_mm: float

    def expand(self, probs: np.ndarray) -> np.ndarray:
        """(S, C) slab values → (Z, C) values of the thin slices (each takes its slab's)."""
        return np.asarray(probs)[self.slab_of]

    def info(self, spacing_in: float, target: float) -> dict[str, Any]:
        """JSON-ready description for ``studies.json``."""
        return {
            "from_spacing_mm": round(spacing_in, 4),
            "target_spacing_mm": round(target, 4),
            "slab_width_mm": round(self.width_mm, 4),
            "n_slices_in": len(self.slab_of),
            "n_slabs": int(self.volume.shape[0]),
            "mapping": "each input slice takes the probabilities of the slab containing it",
        }


def needs_reformat(spacing_mm: float, target_mm: float, ratio: float = REFORMAT_RATIO) -> bool:
    """True when a series ``spacing_mm`` apart is much thinner than the training ``target_mm``."""
    return spacing_mm > 0 and target_mm > 0 and spacing_mm < ratio * target_mm


def slab_index(positions: np.ndarray, target_mm: float) -> tuple[np.ndarray, float]:
    """Assign ascending positions (mm) to equal-width slabs of about ``target_mm``.

    Args:
        positions: (Z,) ascending slice positions along the normal.
        target_mm: wanted slab width.

    Returns:
        ``(slab_of, width)``: (Z,) int slab of each slice, numbered 0.. without gaps (a slab that no slice falls
        in, where the series has a gap, is left out), and the slab width in mm.
    """
    positions = np.asarray(positions, dtype=np.float64)
    gap = float(np.median(np.diff(positions))) if len(positions) > 1 else target_mm
    start = positions[0] - gap / 2
    length = positions[-1] - positions[0] + gap
    n = max(1, int(round(length / target_mm)))
    width = length / n
    raw = np.clip(np.floor((positions - start) / width).astype(np.int64), 0, n - 1)
    _, slab_of = np.unique(raw, return_inverse=True)
    return slab_of.astype(np.int64), width


def reformat_slabs(volume: np.ndarray, meta: dict[str, Any], target_mm: float) -> Slabs:
    """Average a converted thin series into slabs of about ``target_mm`` (see the module docstring).

    Args:
        volume: (Z, H, W) int16 HU from :func:`rsna19.conversion.series.convert_series`.
        meta: its meta (``positions`` ascending, ``sop_uids``, ``spacing``, ``slice_shifts_px``, ``labels``).
        target_mm: the training slice spacing.

    Returns:
        The slabs; ``meta`` is copied, not changed.
    """
    positions = np.asarray(meta["positions"], dtype=np.float64)
    slab_of, width = slab_index(positions, target_mm)
    n = int(slab_of.max()) + 1
    out = np.empty((n, *volume.shape[1:]), dtype=np.int16)
    centres = np.empty(n)
    names: list[str] = []
    keep: list[int] = []
    for s in range(n):
        members = np.flatnonzero(slab_of == s)
        acc = volume[members].astype(np.float32).mean(axis=0)
        out[s] = np.clip(np.rint(acc), -32768, 32767).astype(np.int16)
        centres[s] = positions[members].mean()
        rep = int(members[np.argmin(np.abs(positions[members] - centres[s]))])
        names.append(str(meta["sop_uids"][rep]))
        keep.append(rep)
    slab_meta = copy.deepcopy(meta)
    slab_meta["sop_uids"] = names
    slab_meta["positions"] = [round(float(p), 6) for p in centres]
    slab_meta["spacing"] = [round(float(width), 6), *meta["spacing"][1:]]
    slab_meta["shape"] = list(out.shape)
    if meta.get("slice_shifts_px"):
        slab_meta["slice_shifts_px"] = [meta["slice_shifts_px"][i] for i in keep]
    slab_meta["labels"] = {c: [None] * n for c in meta.get("labels", {})}
    slab_meta["reformat"] = {"slab_width_mm": round(float(width), 6), "slab_of": slab_of.tolist()}
    return Slabs(out, slab_meta, slab_of, float(width))
