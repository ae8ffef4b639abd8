"""Slabs of consecutive slices for the 3D model (``clf3d``), and the averaging of window predictions.

A *slab* is a window of ``S`` consecutive slices ``start … start + S − 1`` of one cached series, read like
:class:`~rsna19.data.datasets.SliceDataset` reads its neighbours (memory map, HU augmentation identical across
the slices, then windows or the CDF mapping): image (S, C, H, W), one label row per slice.

* Training: each series offers ``ceil(Z / S)`` items (longer series are sampled more, like slices are), and
  every item draws its start uniformly over the series from ``(seed, epoch, index)``.
* Prediction: windows tile the series with a stride (default S/2; the last window ends at the last slice), so
  every slice lies in at least one window; :func:`aggregate` averages the overlapping window predictions into
  exactly one prediction per slice.

A series shorter than ``S`` is padded at the end with air; padded positions have ``valid = False`` and
``row = -1`` and never count in the loss or the aggregation.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd
import torch

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.data.augment import AugmentConfig, sample_seed
from rsna19.data.datasets import CacheItems, add_device_affine, read_planes, window_slices
from rsna19.data.transforms import MultiWindow


def window_starts(n_slices: int, slab: int, stride: int) -> np.ndarray:
    """Starts of windows of ``slab`` slices that tile ``n_slices`` with ``stride``; the last one ends at the end.

    A series shorter than the slab has one window starting at 0.
    """
    if stride < 1:
        raise UserError(f"slab stride must be >= 1, got {stride}")
    last = max(n_slices - slab, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return np.asarray(starts, dtype=np.int64)


def label_positions(slab: int, label_slices: int | None) -> tuple[int, int]:
    """``[lo, hi)``: the middle ``label_slices`` positions of a slab (all of them for None)."""
    m = slab if label_slices is None else int(label_slices)
    if not 1 <= m <= slab:
        raise UserError(f"label_slices must be in 1..{slab}, got {label_slices}")
    lo = (slab - m) // 2
    return lo, lo + m


def aggregate(values: np.ndarray, rows: np.ndarray, n_rows: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Average per-window, per-position values into one value per row (slice).

    Args:
        values: (W, S, K) e.g. probabilities of every window.
        rows: (W, S) the row (slice) each position shows; −1 for padding or slices not predicted.
        n_rows: number of rows.
        weights: (S,) optional weight of each window position (e.g. less for the slab's edges).

    Returns:
        (n_rows, K) float64: the weighted mean over every window position that shows the row.

    Raises:
        ValueError: a row that no window shows (the tiling would be broken).
    """
    values = np.asarray(values, dtype=np.float64)
    rows = np.asarray(rows, dtype=np.int64)
    if values.shape[:2] != rows.shape:
        raise ValueError(f"values {values.shape} and rows {rows.shape} disagree")
    w = np.broadcast_to(np.ones(rows.shape[1]) if weights is None else np.asarray(weights, np.float64), rows.shape)
    keep = rows >= 0
    total = np.zeros((n_rows, values.shape[2]), dtype=np.float64)
    count = np.zeros(n_rows, dtype=np.float64)
    np.add.at(total, rows[keep], values[keep] * w[keep][:, None])
    np.add.at(count, rows[keep], w[keep])
    missing = np.flatnonzero(count <= 0)
    if len(missing):
        raise ValueError(f"{len(missing)} of {n_rows} slices are in no window, e.g. row {missing[0]}")
    return total / count[:, None]


class SlabDataset(CacheItems):
    """Windows of ``slab`` consecutive slices of cached series, with per-slice labels.

    Args:
        cache_dir: the conversion cache.
        frame: rows of ``cache_index.parquet`` (``series_uid``, ``z``, ``n_slices``; labels if present). Only its
            slices are labelled and predicted; their series' other slices still serve as context.
        windows: window names or a :class:`MultiWindow`.
        slab: slices per window (S).
        stride: prediction stride (default ``slab // 2``); training uses random starts.
        label_slices: in training, the middle ``M`` positions that count in the loss (their context is
            complete); positions nearer a window edge count only where that edge is the end of the series,
            so every slice is trained. None: all positions.
        size, resize, augment, train, seed, image_dtype: as :class:`~rsna19.data.datasets.SliceDataset`.

    Each item is a dict: ``image`` (S, C, H, W) of ``image_dtype``; ``target`` (S, 6) float32 (NaN where unknown
    or padded); ``rows`` (S,) int64 frame row of each position (−1: padding or not in ``frame``); ``valid`` (S,)
    bool real slices; ``loss_mask`` (S,) bool positions that count in the loss; ``index`` the item number.

    The long keyword list of ``__init__`` stays: each is one ``data:`` / ``augment:`` setting that the family's task
    (:mod:`rsna19.engine.tasks`), the tests and the benchmarks set on their own.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        frame: pd.DataFrame,
        windows: list[str] | MultiWindow,
        slab: int = 8,
        stride: int | None = None,
        label_slices: int | None = None,
        size: int | None = None,
        resize: int | None = None,
        augment: AugmentConfig | None = None,
        train: bool = False,
        seed: int = 0,
        image_dtype: str = "float32",
    ) -> None:
        if slab < 1:
            raise UserError(f"slab must be >= 1 slices, got {slab}")
        self._setup(cache_dir, frame, windows, size, resize, augment, train, seed, image_dtype)
        self.slab = int(slab)
        self.stride = int(stride or max(1, slab // 2))
        self.label_lo, self.label_hi = label_positions(self.slab, label_slices) if train else (0, self.slab)

        # Per series: its length and the frame row of every z (−1 where the slice is not in the frame).
        self.series: list[str] = []
        self.row_of_z: list[np.ndarray] = []
        items: list[tuple[int, int]] = []
        z_all = self.frame["z"].to_numpy(dtype=np.int64)
        for s, (uid, idx) in enumerate(self.frame.groupby("series_uid", sort=True).indices.items()):
            if "n_slices" in self.frame.columns:
                n_z = int(self.frame["n_slices"].iloc[idx[0]])
            else:
                n_z = int(self.volumes(str(uid)).shape[0])
            zs = z_all[idx]
            if zs.min() < 0 or zs.max() >= n_z:
                raise UserError(f"series {uid}: slice z {zs.max()} outside its {n_z} slices")
            row_of_z = np.full(n_z, -1, dtype=np.int64)
            row_of_z[zs] = idx
            self.series.append(str(uid))
            self.row_of_z.append(row_of_z)
            if train:
                items += [(s, -1)] * math.ceil(n_z / self.slab)  # start drawn per epoch in __getitem__
            else:
                items += [(s, int(st)) for st in window_starts(n_z, self.slab, self.stride)]
        self.items = np.asarray(items, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.items)

    def start_of(self, index: int) -> int:
        """The first slice of item ``index`` (random in training, a function of ``(seed, epoch, index)``)."""
        s, start = (int(v) for v in self.items[index])
        if start >= 0:
            return start
        last = max(len(self.row_of_z[s]) - self.slab, 0)
        return int(np.random.default_rng([sample_seed(self.seed, self.epoch, index), 2]).integers(0, last + 1))

    def window_rows(self) -> np.ndarray:
        """(len(self), S) frame row of every position of every window (prediction order; −1 for none)."""
        return np.stack([self._rows(i)[0] for i in range(len(self))]) if len(self) else np.zeros((0, self.slab), int)

    def _rows(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        s = int(self.items[index, 0])
        start = self.start_of(index)
        n_z = len(self.row_of_z[s])
        zs = start + np.arange(self.slab)
        valid = zs < n_z
        rows = np.where(valid, self.row_of_z[s][np.minimum(zs, n_z - 1)], -1)
        return rows, valid, start

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = int(self.items[index, 0])
        rows, valid, start = self._rows(index)
        n_z = len(self.row_of_z[s])
        vol = self.volumes(self.series[s])
        seed = sample_seed(self.seed, self.epoch, index) if self.train else 0
        slices = self.aug.slices(read_planes(vol, start, np.arange(self.slab)), seed)  # beyond the end: air
        offset, draw = self.reference(self.series[s], vol), self.intensity.draw(seed)
        image = window_slices(slices, self.slab, self.windows, self.image_dtype, offset, self.intensity, draw)
        image = self.pixel_aug(image, seed)  # (S, C, H, W)
        target = np.full((self.slab, len(CLASSES)), np.nan, dtype=np.float32)
        target[rows >= 0] = self.targets[rows[rows >= 0]]
        pos = np.arange(self.slab)
        counted = (pos >= self.label_lo) & (pos < self.label_hi)
        counted |= (pos < self.label_lo) & (start == 0)  # the series' first slices are never in a middle
        counted |= (pos >= self.label_hi) & (start + self.slab >= n_z)  # nor its last ones
        loss_mask = counted & (rows >= 0) & np.isfinite(target).all(axis=1)
        item = {
            "image": torch.from_numpy(image),
            "target": torch.from_numpy(target),
            "rows": torch.from_numpy(rows),
            "valid": torch.from_numpy(valid),
            "loss_mask": torch.from_numpy(loss_mask),
            "index": index,
        }
        return add_device_affine(item, self.aug, self.windows, self.image_dtype, vol.shape[1:], seed, self._fill)

    def aggregate(self, window_values: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """One value per frame row from per-window values (W, S, K) in dataset order: see :func:`aggregate`.

        Raises:
            UserError: in training mode (random starts do not tile the series).
        """
        if self.train:
            raise UserError("aggregate needs a prediction dataset (train=False)")
        return aggregate(window_values, self.window_rows(), len(self.frame), weights)
