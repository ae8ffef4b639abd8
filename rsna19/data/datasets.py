"""Datasets over the conversion cache (DESIGN §4, docs/contracts.md).

One sample is one slice ``z`` of one series, with its ``slices`` neighbours ``z - slices//2 … z + slices//2``
read from ``CACHE/<series>/volume.npy`` through a memory map. Neighbours beyond the ends of the series are
air (−1024 HU). The stack is augmented in HU (:mod:`rsna19.data.augment`), then mapped to window channels
(:mod:`rsna19.data.transforms`):

* ``layout="channels"``: image ``(S·C, H, W)``, channel ``s·C + c`` = window ``c`` of neighbour ``s`` (2D when
  ``S = 1``, 2.5D otherwise: ``3c``, ``5c``, ``3x3`` …).
* ``layout="stack"``: image ``(S, C, H, W)`` for combine-last models.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from rsna19.constants import AIR_HU, CLASSES
from rsna19.data.augment import AugmentConfig, StackAugment, sample_seed
from rsna19.data.transforms import CdfMapping, MultiWindow
from rsna19.errors import UserError

#: Columns a cache index needs for the datasets.
INDEX_COLUMNS: tuple[str, ...] = ("sop_uid", "series_uid", "study_uid", "patient_id", "split", "z", "n_slices")


def read_cache_index(cache_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``CACHE/cache_index.parquet`` and check its columns.

    Raises:
        UserError: the file is missing or lacks a contract column.
    """
    path = Path(cache_dir) / "cache_index.parquet"
    if not path.is_file():
        raise UserError(f"cache index not found: {path} (run `rsna19 convert` first, or pass --cache)")
    df = pd.read_parquet(path)
    missing = [c for c in (*INDEX_COLUMNS, *CLASSES) if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def slice_offsets(slices: int) -> np.ndarray:
    """Offsets of the neighbours of a centre slice: ``slices = 5`` → ``[-2, -1, 0, 1, 2]``.

    Raises:
        UserError: for an even or non-positive count (the centre slice must be the middle one).
    """
    if slices < 1 or slices % 2 == 0:
        raise UserError(f"data.slices must be an odd number >= 1, got {slices}")
    return np.arange(slices) - slices // 2


class VolumeCache:
    """Memory maps of ``volume.npy`` files, the most recent ``capacity`` kept open (each holds a descriptor)."""

    def __init__(self, cache_dir: str | os.PathLike[str], capacity: int = 64) -> None:
        self.cache_dir = Path(cache_dir)
        self.capacity = capacity
        self._open: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, series_uid: str) -> np.ndarray:
        """The (Z, H, W) int16 memory map of one series."""
        vol = self._open.get(series_uid)
        if vol is not None:
            self._open.move_to_end(series_uid)
            return vol
        path = self.cache_dir / series_uid / "volume.npy"
        try:
            vol = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            raise UserError(f"volume not found: {path} (is the cache complete?)") from None
        if vol.ndim != 3:
            raise UserError(f"{path}: expected a (Z, H, W) volume, got shape {vol.shape}")
        self._open[series_uid] = vol
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return vol

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes open their own maps.
        return {"cache_dir": self.cache_dir, "capacity": self.capacity, "_open": OrderedDict()}


def read_stack(vol: np.ndarray, z: int, offsets: np.ndarray) -> np.ndarray:
    """Slices ``z + offsets`` of ``vol`` as an (H, W, S) float32 stack; slices outside the volume are air.

    Args:
        vol: (Z, H, W) volume (a memory map is fine).
        z: centre slice.
        offsets: (S,) integer offsets.
    """
    n_z, h, w = vol.shape
    out = np.empty((h, w, len(offsets)), dtype=np.float32)
    for s, off in enumerate(offsets):
        zz = z + int(off)
        if 0 <= zz < n_z:
            out[:, :, s] = vol[zz]
        else:
            out[:, :, s] = AIR_HU
    return out


class SliceDataset(Dataset):
    """Slices of cached series with their neighbours, augmented and windowed.

    Args:
        cache_dir: the conversion cache.
        frame: rows of ``cache_index.parquet`` to serve (needs ``series_uid``, ``z``; labels if present).
        windows: window names or a :class:`MultiWindow`.
        slices: odd number of neighbouring slices per sample (1 = 2D).
        layout: ``"channels"`` → image (S·C, H, W); ``"stack"`` → image (S, C, H, W).
        size: output crop size (random crop in training, centre crop otherwise); None keeps the cache size.
        resize: resize the slices to this size before cropping; None keeps them.
        augment: augmentation settings, used when ``train``.
        train: random crop + augmentation when True.
        seed: base seed of the per-sample augmentation generators.

    Each item is a dict: ``image`` float32 tensor, ``target`` (6,) float32 (NaN where labels are unknown),
    ``index`` the row number in ``frame``.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        frame: pd.DataFrame,
        windows: list[str] | MultiWindow,
        slices: int = 1,
        layout: Literal["channels", "stack"] = "channels",
        size: int | None = None,
        resize: int | None = None,
        augment: AugmentConfig | None = None,
        train: bool = False,
        seed: int = 0,
    ) -> None:
        if layout not in ("channels", "stack"):
            raise UserError(f"data.layout must be 'channels' or 'stack', got {layout!r}")
        self.frame = frame.reset_index(drop=True)
        self.series = self.frame["series_uid"].astype(str).to_numpy()
        self.z = self.frame["z"].to_numpy(dtype=np.int64)
        if all(c in self.frame.columns for c in CLASSES):
            self.targets = self.frame[list(CLASSES)].to_numpy(dtype=np.float32)
        else:
            self.targets = np.full((len(self.frame), len(CLASSES)), np.nan, dtype=np.float32)
        self.windows = windows if isinstance(windows, MultiWindow) else MultiWindow(windows)
        self.offsets = slice_offsets(slices)
        self.layout = layout
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.volumes = VolumeCache(cache_dir)
        self.aug = StackAugment(size, resize, augment, train)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before iterating, in every process)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.frame)

    def __getitem__(self, index: int) -> dict[str, Any]:
        vol = self.volumes(self.series[index])
        stack = read_stack(vol, int(self.z[index]), self.offsets)  # (H, W, S) HU
        if not self.aug.is_identity:
            stack = self.aug(stack, sample_seed(self.seed, self.epoch, index) if self.train else 0)
        # (H, W, S) view → contiguous (S, H, W): one copy, then every window reads contiguous planes.
        image = self.windows(np.ascontiguousarray(stack.transpose(2, 0, 1)), axis=1)  # (S, C, H, W)
        if self.layout == "channels":
            image = image.reshape(-1, *image.shape[2:])
        return {
            "image": torch.from_numpy(image),
            "target": torch.from_numpy(self.targets[index].copy()),
            "index": index,
        }


def fit_cdf(
    cache_dir: str | os.PathLike[str], series_uids: list[str], max_series: int = 16, seed: int = 0
) -> CdfMapping:
    """Fit a :class:`CdfMapping` on a subsample of the voxels of a few training series.

    Args:
        cache_dir: the conversion cache.
        series_uids: candidate (training) series.
        max_series: how many series to read at most (chosen with ``seed``).
        seed: selection seed.
    """
    rng = np.random.default_rng(seed)
    uids = sorted(set(series_uids))
    chosen = rng.choice(uids, size=min(max_series, len(uids)), replace=False) if uids else []
    volumes = VolumeCache(cache_dir)
    sample = [np.asarray(volumes(str(u))[:, ::4, ::4]).ravel() for u in chosen]
    return CdfMapping.fit(np.concatenate(sample) if sample else np.zeros(0, np.float32))


def read_meta(cache_dir: str | os.PathLike[str], series_uid: str) -> dict[str, Any]:
    """``CACHE/<series>/meta.json`` as a dict."""
    path = Path(cache_dir) / series_uid / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"meta.json not found: {path}") from None
