"""Subtype masks for the segmentation-aided model (docs/contracts.md ``masks/``).

``DATA/masks/<series_uid>.npz`` holds ``mask`` uint8 (Z, rows, cols) in the DICOM pixel frame — bit ``c`` set
where subtype ``SUBTYPES[c]`` covers the voxel — and ``sop_uids`` (Z,) in spatial order. The synthetic dataset
writes one per series; real data rarely has any, and a series without a file simply has no mask
(``has_mask = False``: it trains the classification head only).

A mask is brought into the cache frame by :func:`rsna19.conversion.convert_mask`, the converter's own map
(slice selection by SOP UID, tilt shift, in-plane resampling, crop; nearest neighbour), so it lies on the
converted volume exactly. In a training sample, the mask goes through the same augmentation as the image
(:class:`SegSliceDataset`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsna19.conversion import convert_mask
from rsna19.conversion.geometry import TILT_THRESHOLD_DEG
from rsna19.core.constants import AIR_HU, SUBTYPES
from rsna19.core.errors import UserError
from rsna19.data.datasets import SliceDataset, read_meta, read_planes
from rsna19.data.intensity import prepare_slice

#: HU stand-ins of mask values 0/1 while a mask rides through the HU augmentation with the image (see
#: :meth:`SegSliceDataset.__getitem__`): 0 is air, so padding (air) reads as "no mask".
_MASK_OFF, _MASK_ON = float(AIR_HU), float(-AIR_HU)


def read_mask_file(path: str | os.PathLike[str]) -> tuple[np.ndarray, list[str]]:
    """``mask`` (Z, rows, cols) uint8 and ``sop_uids`` (Z,) of a masks/<series>.npz file.

    Raises:
        UserError: unreadable file, missing arrays or inconsistent lengths (the message names the file).
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            mask, uids = npz["mask"], [str(u) for u in npz["sop_uids"]]
    except KeyError as exc:
        raise UserError(f"{path}: missing array {exc} (needs 'mask' and 'sop_uids')") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read mask file {path}: {exc}") from exc
    if mask.ndim != 3 or len(uids) != mask.shape[0]:
        raise UserError(f"{path}: mask shape {mask.shape} does not match {len(uids)} sop_uids")
    return mask.astype(np.uint8, copy=False), uids


def _mapping_meta(meta: dict[str, Any], where: str) -> dict[str, Any]:
    """``meta`` with the map fields :func:`convert_mask` needs; caches written without them had no tilt shift."""
    out = dict(meta)
    n = len(out["sop_uids"])
    out.setdefault("scale", [1.0, 1.0])
    if "slice_shifts_px" not in out:
        corrected = out.get("tilt_corrected", abs(float(out.get("tilt_deg", 0.0))) > TILT_THRESHOLD_DEG)
        if corrected:
            raise UserError(f"{where}: meta.json of a tilt-corrected series lacks slice_shifts_px; re-convert it")
        out["slice_shifts_px"] = [[0.0, 0.0]] * n
    return out


def series_mask(masks_dir: str | os.PathLike[str], series_uid: str, meta: dict[str, Any]) -> np.ndarray | None:
    """The subtype bitmask of a series in the cache frame, or None where it has no mask file.

    Args:
        masks_dir: the ``masks/`` folder.
        series_uid: the series.
        meta: its cache ``meta.json`` (``sop_uids``, ``crop_box``, ``original_shape``, shifts, scale).

    Returns:
        (Z, H, W) uint8 bitmask aligned with ``volume.npy`` (bit c = ``SUBTYPES[c]``).

    Raises:
        UserError: the file does not fit the series (names the file and why).
    """
    path = Path(masks_dir) / f"{series_uid}.npz"
    if not path.is_file():
        return None
    mask, uids = read_mask_file(path)
    try:
        return convert_mask(mask, _mapping_meta(meta, str(path)), sop_uids=uids)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from exc


def unpack_bits(bitmask: np.ndarray, n: int = len(SUBTYPES)) -> np.ndarray:
    """(..., H, W) bitmask → (..., n, H, W) uint8 0/1 channels, channel c = bit c."""
    bits = (np.asarray(bitmask)[..., None, :, :] >> np.arange(n, dtype=np.uint8)[:, None, None]) & 1
    return bits.astype(np.uint8)


class MaskStore:
    """Cache-frame masks of series, the most recent ``capacity`` kept in memory.

    Args:
        cache_dir: the conversion cache (for meta.json).
        masks_dir: the ``masks/`` folder; None means no series has masks.
        capacity: converted series kept.
    """

    def __init__(
        self, cache_dir: str | os.PathLike[str], masks_dir: str | os.PathLike[str] | None, capacity: int = 8
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.masks_dir = Path(masks_dir) if masks_dir else None
        self.capacity = capacity
        self._done: OrderedDict[str, np.ndarray | None] = OrderedDict()

    def __call__(self, series_uid: str) -> np.ndarray | None:
        """(Z, H, W) uint8 bitmask in the cache frame, or None."""
        if self.masks_dir is None:
            return None
        if series_uid in self._done:
            self._done.move_to_end(series_uid)
            return self._done[series_uid]
        out = None
        if (self.masks_dir / f"{series_uid}.npz").is_file():
            out = series_mask(self.masks_dir, series_uid, read_meta(self.cache_dir, series_uid))
        self._done[series_uid] = out
        if len(self._done) > self.capacity:
            self._done.popitem(last=False)
        return out

    def __getstate__(self) -> dict[str, Any]:
        # Loader workers convert their own.
        return {**self.__dict__, "_done": OrderedDict()}


class SegSliceDataset(SliceDataset):
    """:class:`SliceDataset` items plus the subtype masks of the centre slice, augmented with the image.

    Args:
        masks_dir: the ``masks/`` folder (None: no masks anywhere).
        other arguments: as :class:`SliceDataset`.

    Adds to each item ``mask`` (5, H, W) float32 in {0, 1} (zeros without a mask) and ``has_mask`` bool.
    """

    def __init__(self, *args: Any, masks_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.masks = MaskStore(self.volumes.cache_dir, masks_dir)

    def __getitem__(self, index: int) -> dict[str, Any]:
        series, z = self.series[index], int(self.z[index])
        vol = self.volumes(series)
        planes = read_planes(vol, z, self.offsets)  # S (H, W) HU planes
        full = self.masks(series)
        has_mask = full is not None
        if has_mask:
            if full.shape != vol.shape:
                raise UserError(f"series {series}: mask {full.shape} does not match volume {vol.shape}")
            # The 5 mask channels ride along as extra HU planes (0 → air, 1 → +1024), so they get exactly the
            # image's resize/crop/affine/flips; linear resampling thresholded at the midpoint is a clean mask
            # resampling, and padding (air) reads as "no blood".
            planes += list(np.where(unpack_bits(full[z]) > 0, _MASK_ON, _MASK_OFF).astype(np.float32))
        seed = self.sample_seed(index)
        stack = self.aug(planes, seed)  # (S [+ 5], H, W)
        n = len(self.offsets)
        offset, draw = self.reference(series, vol), self.intensity.draw(seed)
        for k in range(n):  # the image slices only: the mask planes ride along unchanged
            prepare_slice(stack[k], offset, self.intensity, draw, k)
        image = self.pixel_aug(self.windows(stack[:n], axis=1, dtype=self.image_dtype), seed)  # (S, C, H, W)
        if self.layout == "channels":
            image = image.reshape(-1, *image.shape[2:])
        if has_mask:
            mask = (stack[n:] > 0).astype(np.float32)
        else:
            mask = np.zeros((len(SUBTYPES), *stack.shape[1:]), dtype=np.float32)
        item = {
            "image": torch.from_numpy(image),
            "target": torch.from_numpy(self.targets[index].copy()),
            "mask": torch.from_numpy(mask),
            "has_mask": has_mask,
            "index": index,
        }
        return self.add_device_affine(item, planes[0].shape, seed)  # the task warps the mask with the image
