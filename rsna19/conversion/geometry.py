"""Slice order of a series, its spacing and the shifts that undo gantry tilt (normal, positions and the tilt formula
itself: :mod:`rsna19.io.dicom`).

Conventions (DICOM LPS, millimetres): pixel (row i, col j) lies at ``IPP + j·Δc·r + i·Δr·c`` where ``r``/``c``
are the row/column direction cosines (IOP) and PixelSpacing = (Δr, Δc). The slice normal is ``n = r × c`` and a
slice's position along it is ``IPP · n``.
"""

from __future__ import annotations

import numpy as np

#: Tilts at or below this many degrees are treated as no tilt.
TILT_THRESHOLD_DEG = 0.5

#: Two slices whose positions differ by less than this (mm) are duplicates.
DUPLICATE_TOLERANCE_MM = 1e-2


def order_slices(positions: np.ndarray, keys: list[str]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Spatial order of a series and its duplicated positions.

    Slices are sorted by position (ties broken by ``keys``, e.g. SOP UIDs, so the order is deterministic).
    Where several slices share a position (within :data:`DUPLICATE_TOLERANCE_MM`) the first one is kept.

    Args:
        positions: (Z,) positions along the normal.
        keys: Z strings breaking ties.

    Returns:
        ``keep``: indices into the inputs of the kept slices in ascending position; ``duplicates``: pairs
        ``(dropped, kept)`` of input indices.
    """
    order = sorted(range(len(keys)), key=lambda i: (float(positions[i]), keys[i]))
    keep: list[int] = []
    duplicates: list[tuple[int, int]] = []
    for i in order:
        if keep and abs(positions[i] - positions[keep[-1]]) < DUPLICATE_TOLERANCE_MM:
            duplicates.append((i, keep[-1]))
        else:
            keep.append(i)
    return np.asarray(keep, dtype=np.int64), duplicates


def tilt_shifts(ipps: np.ndarray, iop: np.ndarray, pixel_spacing: tuple[float, float]) -> np.ndarray:
    """In-plane shifts (pixels) that put every slice on the grid of the first one, seen along the normal.

    A point at pixel (a, b) of the corrected slice k lies at ``IPP_0 + ((IPP_k − IPP_0)·n) n + b·Δc·r + a·Δr·c``;
    the same point is input pixel ``(a − s_row, b − s_col)`` of slice k with ``s_row = (IPP_k − IPP_0)·c / Δr``
    and ``s_col = (IPP_k − IPP_0)·r / Δc``. The corrected slice is the input moved by (s_row, s_col).

    Args:
        ipps: (Z, 3) IPPs in slice order.
        iop: (6,) orientation shared by the series.
        pixel_spacing: (Δr, Δc) in mm.

    Returns:
        (Z, 2) float64 shifts (rows, cols); the first is (0, 0).
    """
    ipps = np.asarray(ipps, dtype=np.float64)
    iop = np.asarray(iop, dtype=np.float64)
    d = ipps - ipps[:1]
    return np.stack([d @ iop[3:] / pixel_spacing[0], d @ iop[:3] / pixel_spacing[1]], axis=1)


def slice_spacing(positions: np.ndarray, fallback: float) -> float:
    """Slice spacing along the normal: median gap between consecutive positions, or ``fallback``."""
    if len(positions) < 2:
        return float(fallback)
    return float(np.median(np.diff(np.sort(positions))))
