"""Datasets over the conversion cache (docs/architecture.md, "Model inputs"; docs/contracts.md).

One sample is one slice ``z`` of one series, with its ``slices`` neighbours ``z - slices//2 … z + slices//2``
read from ``CACHE/<series>/volume.npy`` through a memory map. Neighbours beyond the ends of the series are
air (−1024 HU). The stack is resized, cropped and augmented in HU by one warp per slice
(:mod:`rsna19.data.augment`), referenced to the series' brain tissue and given the acquisition augmentations in HU
(:mod:`rsna19.data.reference`, :mod:`rsna19.data.intensity`; both optional), then mapped to window channels
(:mod:`rsna19.data.transforms`): float32, or with
``image_dtype="uint8"`` bytes that the consumer decodes on its device (:func:`rsna19.data.transforms.decode_image`):

* ``layout="channels"``: image ``(S·C, H, W)``, channel ``s·C + c`` = window ``c`` of neighbour ``s`` (2D when
  ``S = 1``, 2.5D otherwise: ``3c``, ``5c``, ``3x3`` …).
* ``layout="stack"``: image ``(S, C, H, W)`` for combine-last models.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from rsna19.core.constants import AIR_HU, CLASSES
from rsna19.core.errors import UserError
from rsna19.data.augment import AugmentConfig, PixelAugment, StackAugment, sample_seed
from rsna19.data.intensity import IntensityAugment, IntensityDraw, prepare_slice
from rsna19.data.reference import SeriesReference
from rsna19.data.transforms import CdfMapping, MultiWindow, decode_image, parse_image_dtype

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


def slice_ids(rows: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The identity columns every per-slice output starts with (docs/contracts.md): SOP, series, study and patient
    UIDs, ``slice_idx`` (the cache's ``z``) and the fold, for cache-index ``rows``."""
    return pd.DataFrame(
        {
            "sop_uid": rows["sop_uid"].astype(str).to_numpy(),
            "series_uid": rows["series_uid"].astype(str).to_numpy(),
            "study_uid": rows["study_uid"].astype(str).to_numpy(),
            "patient_id": rows["patient_id"].astype(str).to_numpy(),
            "slice_idx": rows["z"].to_numpy(dtype=np.int64),
            "fold": np.full(len(rows), fold, dtype=np.int64),
        }
    )


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
            vol = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise UserError(f"volume not found: {path} (is the cache complete?)") from None
        except ValueError as exc:  # an object array (a pickle inside .npy) or a damaged header: never unpickled
            raise UserError(f"cannot read volume {path}: {exc}") from None
        if vol.ndim != 3:
            raise UserError(f"{path}: expected a (Z, H, W) volume, got shape {vol.shape}")
        self._open[series_uid] = vol
        if len(self._open) > self.capacity:
            self._open.popitem(last=False)
        return vol

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes open their own maps.
        return {"cache_dir": self.cache_dir, "capacity": self.capacity, "_open": OrderedDict()}


def read_planes(vol: np.ndarray, z: int, offsets: np.ndarray) -> list[np.ndarray]:
    """Slices ``z + offsets`` of ``vol`` as S (H, W) planes; slices outside the volume are air.

    The planes are views into ``vol`` (no copy from a memory map until the warp reads them) and one shared
    read-only air plane.

    Args:
        vol: (Z, H, W) volume (a memory map is fine).
        z: centre slice.
        offsets: (S,) integer offsets.
    """
    n_z, h, w = vol.shape
    air = None
    planes = []
    for off in offsets:
        zz = z + int(off)
        if 0 <= zz < n_z:
            planes.append(vol[zz])
        else:
            if air is None:
                air = np.broadcast_to(np.asarray(AIR_HU, dtype=vol.dtype), (h, w))
            planes.append(air)
    return planes


def window_slices(
    slices: Iterable[np.ndarray],
    n: int,
    windows: MultiWindow,
    dtype: np.dtype,
    offset: float = 0.0,
    intensity: IntensityAugment | None = None,
    draw: IntensityDraw | None = None,
) -> np.ndarray:
    """Window each of ``n`` (h, w) HU slices as it comes (:meth:`StackAugment.slices`) into (n, C, h, w).

    Args:
        slices: float32 HU slices (modified in place: the loader's reused buffers).
        n, windows, dtype: how many slices, the HU mapping and the output dtype.
        offset: HU subtracted first (the series' brain reference, :class:`SeriesReference`).
        intensity, draw: the acquisition augmentation of the sample (training), applied after the offset.
    """
    out = None
    for s, hu in enumerate(slices):
        if out is None:
            out = np.empty((n, windows.n_channels, *hu.shape), dtype=dtype)
        prepare_slice(hu, offset, intensity, draw, s)
        windows.map_slice(hu, out[s])
    assert out is not None
    return out


def air_fill(windows: MultiWindow, dtype: np.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The decoded value of air (−1024 HU) in every channel of an image of ``shape`` without H, W: (S·C,) or (S, C).

    0 in every window, −1 in a float32 CDF channel, 0 in a uint8 one (see :mod:`rsna19.data.transforms`).
    """
    air = windows(np.full((1, 1), AIR_HU, dtype=np.float32), axis=0, dtype=dtype)[:, 0, 0]  # (C,)
    values = decode_image(torch.from_numpy(air))
    return values.repeat(int(np.prod(shape)) // len(values)).reshape(shape)


def add_device_affine(
    item: dict[str, Any],
    aug: StackAugment,
    windows: MultiWindow,
    dtype: np.dtype,
    plane_shape: tuple[int, int],
    seed: int,
    fills: dict[tuple[int, ...], torch.Tensor],
) -> dict[str, Any]:
    """With ``augment.affine_on_device``: add the sample's ``affine`` (2, 3) theta and ``fill`` (the value of air in
    each channel of ``item["image"]``, cached in ``fills`` per image shape) for :func:`device_affine`.

    Args:
        item: a dataset item with its ``image``.
        aug, windows, dtype: the dataset's geometry, HU mapping and image dtype.
        plane_shape, seed: the slices' (H, W) before the resize, and the sample's seed, as given to ``aug``.
        fills: the dataset's cache of fill tensors.
    """
    if aug.on_device:
        item["affine"] = torch.from_numpy(aug.device_theta(plane_shape, seed))
        shape = tuple(item["image"].shape[:-2])
        if shape not in fills:  # the same for every item: computed once
            fills[shape] = air_fill(windows, dtype, shape)
        item["fill"] = fills[shape]
    return item


class CacheItems(Dataset):
    """What :class:`SliceDataset` and :class:`~rsna19.data.slab.SlabDataset` share: the frame and its labels, the
    HU → channel mapping and the augmentations, drawn per sample from ``(seed, epoch, index)``."""

    def _setup(
        self,
        cache_dir: str | os.PathLike[str],
        frame: pd.DataFrame,
        windows: list[str] | MultiWindow,
        size: int | None,
        resize: int | None,
        augment: AugmentConfig | None,
        train: bool,
        seed: int,
        image_dtype: str,
    ) -> None:
        """Set the shared state from the constructors' arguments of the same names."""
        self.frame = frame.reset_index(drop=True)
        if all(c in self.frame.columns for c in CLASSES):
            self.targets = self.frame[list(CLASSES)].to_numpy(dtype=np.float32)  # (N, 6)
        else:
            self.targets = np.full((len(self.frame), len(CLASSES)), np.nan, dtype=np.float32)
        self.windows = windows if isinstance(windows, MultiWindow) else MultiWindow(windows)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.volumes = VolumeCache(cache_dir)
        self.aug = StackAugment(size, resize, augment, train)
        self.pixel_aug = PixelAugment(augment, train)
        self.intensity = IntensityAugment(augment, train)
        self.reference = SeriesReference(self.windows.reference_hu)
        self.image_dtype = parse_image_dtype(image_dtype)
        self._fill: dict[tuple[int, ...], torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch`` (call before iterating, in every process)."""
        self.epoch = int(epoch)


class SliceDataset(CacheItems):
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
        image_dtype: ``float32`` or ``uint8`` images (see :mod:`rsna19.data.transforms`).

    Each item is a dict: ``image`` tensor of ``image_dtype``, ``target`` (6,) float32 (NaN where labels are
    unknown), ``index`` the row number in ``frame``.

    The long keyword list of ``__init__`` stays: each is one ``data:`` / ``augment:`` setting that the family's task
    (:mod:`rsna19.engine.tasks`), the tests and the benchmarks set on their own.
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
        image_dtype: str = "float32",
    ) -> None:
        if layout not in ("channels", "stack"):
            raise UserError(f"data.layout must be 'channels' or 'stack', got {layout!r}")
        self._setup(cache_dir, frame, windows, size, resize, augment, train, seed, image_dtype)
        self.series = self.frame["series_uid"].astype(str).to_numpy()
        self.z = self.frame["z"].to_numpy(dtype=np.int64)
        self.offsets = slice_offsets(slices)
        self.layout = layout

    def __len__(self) -> int:
        return len(self.frame)

    def sample_seed(self, index: int) -> int:
        """The augmentation seed of item ``index`` in the current epoch (0 when not training)."""
        return sample_seed(self.seed, self.epoch, index) if self.train else 0

    def __getitem__(self, index: int) -> dict[str, Any]:
        vol = self.volumes(self.series[index])
        planes = read_planes(vol, int(self.z[index]), self.offsets)
        seed = self.sample_seed(index)
        offset = self.reference(self.series[index], vol)
        slices = self.aug.slices(planes, seed)
        draw = self.intensity.draw(seed)
        image = window_slices(slices, len(planes), self.windows, self.image_dtype, offset, self.intensity, draw)
        image = self.pixel_aug(image, seed)
        if self.layout == "channels":
            image = image.reshape(-1, *image.shape[2:])
        target = torch.from_numpy(self.targets[index].copy())
        item = {"image": torch.from_numpy(image), "target": target, "index": index}
        return self.add_device_affine(item, planes[0].shape, seed)

    def add_device_affine(self, item: dict[str, Any], plane_shape: tuple[int, int], seed: int) -> dict[str, Any]:
        """With ``augment.affine_on_device``: add the sample's ``affine`` (2, 3) ``theta`` and ``fill``, the value
        of air in each image channel (the image's shape without H, W), for :func:`device_affine`."""
        return add_device_affine(item, self.aug, self.windows, self.image_dtype, plane_shape, seed, self._fill)


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
