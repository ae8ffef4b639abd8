"""Geometric augmentation of a slice stack (docs/architecture.md, "Model inputs"), as one fused warp per slice.

Every sample's geometry — resize, random (or centre) crop, shift-scale-rotate, flips, transpose and rot90 — is
composed into a single 2×3 matrix that maps an output pixel to its source pixel, and each slice of the stack goes
through one ``cv2.warpAffine`` with it. All slices of a sample therefore get exactly the same transform, and each
output pixel is interpolated once (a chain of separate ops would resample, copy and re-layout the stack several
times: that chain ran at 150 samples/s per worker at 5 × 384², the fused warp at ~500, docs/benchmarks.md).

It runs on HU values (before windowing), so whatever the windows, pixels that come from outside the slice are
air (−1024 HU). A crop followed by a rotation pulls real pixels from beyond the crop into the corners instead of
padding there, as the warp reads the whole slice.

Acquisition augmentations in HU (reconstruction kernel, dose noise, HU gain and offset) are
:mod:`rsna19.data.intensity`'s, set by the ``intensity_p`` … ``hu_offset`` fields; they run on each HU slice after
the warp. Other pixel-level augmentations (brightness / contrast …) are albumentations transforms listed in
``AugmentConfig.extra`` (:class:`PixelAugment`); they run on the windowed image, all slices and windows of a sample
as the channels of one image.

Each sample is augmented with a generator seeded from ``(seed, epoch, index)``: the result depends neither on the
worker that loads it nor on the order, so training is reproducible and a resumed run sees the same augmentations
as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F

from rsna19.core.constants import AIR_HU
from rsna19.core.cv2_threads import cv2
from rsna19.core.errors import UserError

_AREA = cv2.INTER_AREA  # resize: area averaging, a clean downsampling


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the training augmentations (all identical across the slices of a sample)."""

    enabled: bool = True
    hflip: float = 0.5
    vflip: float = 0.5
    transpose: float = 0.5
    rot90: float = 0.0
    affine: float = 0.5
    shift: float = 0.0625
    scale: float = 0.1
    rotate: float = 15.0
    # Draw the shift-scale-rotate in the loader but apply it on the training device (bilinear ``grid_sample`` of the
    # windowed batch, :func:`device_affine`): the loader then only crops and flips, which is exact and ~2× faster
    # per worker. For GPU training; on a CPU it moves the same work into the training process.
    affine_on_device: bool = False
    # Pixel-level albumentations transforms applied after the windowing, e.g.
    # [{name: GaussNoise, std_range: [0.01, 0.03], p: 0.3}, {name: RandomBrightnessContrast, p: 0.3}].
    extra: list[dict[str, Any]] = field(default_factory=list)
    # Acquisition (scanner) augmentations in HU after the geometry (rsna19/data/intensity.py): each of kernel,
    # noise, gain and offset is drawn once per sample with probability ``intensity_p`` (0: all off).
    intensity_p: float = 0.0
    sharpen: list[float] = field(default_factory=lambda: [0.0, 0.0])  # unsharp amount: < 0 blurs, > 0 sharpens
    kernel_sigma: float = 1.0  # σ of the unsharp mask's Gaussian, in output pixels
    noise_sd: float = 0.0  # extra dose noise: SD uniform in [0, noise_sd] HU
    hu_scale: float = 0.0  # HU gain uniform in [1 - hu_scale, 1 + hu_scale]
    hu_offset: float = 0.0  # HU offset uniform in [-hu_offset, hu_offset]
    # Metal-like streaks (lines through a point, bright or dark, inside the body), drawn with probability
    # ``streak_p`` per sample, each line up to ``streak_hu`` HU (rsna19/data/intensity.py).
    streak_p: float = 0.0
    streak_hu: float = 120.0


def _translate(tx: float, ty: float) -> np.ndarray:
    return np.array([[1.0, 0.0, tx], [0.0, 1.0, ty], [0.0, 0.0, 1.0]])


def dihedral_matrix(n: int, hflip: bool, vflip: bool, transpose: bool, rot90: int) -> np.ndarray:
    """3×3 output → input pixel map of flips, transpose and ``rot90`` quarter turns of an ``n × n`` image.

    The ops apply to the image in the order hflip, vflip, transpose, rot90 (``np.rot90`` direction); pixel
    centres are at integer coordinates ``(x, y)`` = (column, row).
    """
    m = np.eye(3)
    last = n - 1.0
    if hflip:  # out[y, x] = in[y, last - x]
        m = m @ np.array([[-1.0, 0.0, last], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    if vflip:
        m = m @ np.array([[1.0, 0.0, 0.0], [0.0, -1.0, last], [0.0, 0.0, 1.0]])
    if transpose:
        m = m @ np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    for _ in range(rot90 % 4):  # np.rot90: out[y, x] = in[x, last - y]
        m = m @ np.array([[0.0, -1.0, last], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    return m


def moves_whole_pixels(m: np.ndarray) -> bool:
    """Whether the map ``m`` (2×3 or 3×3) only flips, transposes and shifts by whole pixels (exact resampling)."""
    return bool(np.all(np.isin(m[:2, :2], (-1.0, 0.0, 1.0))) and np.all(m[:2, 2] == np.round(m[:2, 2])))


def pixel_view(
    m: np.ndarray, out_shape: tuple[int, int], in_shape: tuple[int, int]
) -> tuple[slice, slice, bool] | None:
    """Numpy indexing that equals the output → input map ``m`` when it moves whole pixels within the input.

    Args:
        m: 2×3 (or 3×3) map; its linear part must be a signed permutation (flips, transpose) and its offset whole
            pixels.
        out_shape: (h, w) of the output.
        in_shape: (H, W) of the input.

    Returns:
        ``(rows, cols, transposed)`` such that ``out = p[rows, cols]`` (then ``.T`` if ``transposed``), or None
        when ``m`` resamples or reads outside the input.
    """
    if not moves_whole_pixels(m):
        return None
    a, t = m[:2, :2], m[:2, 2]
    oh, ow = out_shape
    tx, ty = int(t[0]), int(t[1])
    transposed = a[0, 0] == 0
    if transposed:  # x_in = b·y + tx, y_in = c·x + ty: index by (x, y), then transpose
        rows, cols = _pixel_axis(ty, a[1, 0], ow, in_shape[0]), _pixel_axis(tx, a[0, 1], oh, in_shape[1])
    else:  # x_in = a·x + tx, y_in = d·y + ty
        rows, cols = _pixel_axis(ty, a[1, 1], oh, in_shape[0]), _pixel_axis(tx, a[0, 0], ow, in_shape[1])
    if rows is None or cols is None:
        return None
    return rows, cols, bool(transposed)


def _pixel_axis(start: int, sign: float, n: int, size: int) -> slice | None:
    """The slice of ``start, start ± 1, …`` (n indices) within ``[0, size)``, or None if it leaves it."""
    if sign > 0:
        return slice(start, start + n) if start >= 0 and start + n <= size else None
    last = start - n + 1
    if last < 0 or start >= size:
        return None
    return slice(start, last - 1 if last > 0 else None, -1)


def affine_matrix(size: tuple[int, int], scale: float, angle_deg: float, shift: tuple[float, float]) -> np.ndarray:
    """3×3 output → input map of a zoom by ``scale`` and a rotation by ``angle_deg`` about the image centre,
    then a shift of ``shift`` pixels (x, y).

    Args:
        size: (height, width) of the image the transform acts on.
    """
    h, w = size
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    a = math.radians(angle_deg)
    # The forward map is p' = s·R·(p − c) + c + t; the warp needs its inverse p = R^T·(p' − c − t)/s + c.
    inv = np.array([[math.cos(a), math.sin(a), 0.0], [-math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]]) / scale
    inv[2, 2] = 1.0
    return _translate(cx, cy) @ inv @ _translate(-cx - shift[0], -cy - shift[1])


class StackAugment:
    """Resize, crop, shift-scale-rotate, flips and transpose/rot90 of an (S, H, W) HU stack, in one warp per slice.

    Args:
        size: output crop (random crop when training, centre crop otherwise; air beyond the slice); None keeps
            the (resized) input size.
        resize: resize the (square) input to this size first (area interpolation: a clean downsampling); None
            keeps it.
        cfg: augmentation settings; None or ``enabled=False`` means geometry only (resize + centre crop).
        train: random crop and augmentations when True, deterministic centre crop when False.
    """

    def __init__(self, size: int | None, resize: int | None, cfg: AugmentConfig | None, train: bool) -> None:
        self.size = size
        self.resize = resize
        self.cfg = cfg if (train and cfg is not None and cfg.enabled) else None
        self._scratch: dict[str, np.ndarray] = {}
        self._last_draw: tuple[tuple[tuple[int, ...], int], tuple[np.ndarray, np.ndarray | None]] | None = None

    def __getstate__(self) -> dict[str, object]:
        # Loader workers make their own scratch buffers.
        return {**self.__dict__, "_scratch": {}}

    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A float32 array kept between calls: a fresh multi-MB array per sample costs more in page faults
        (~0.15 ms per 400² slice on a 2-core VM) than the copy into it."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape != shape:
            buf = self._scratch[name] = np.empty(shape, dtype=np.float32)
        return buf

    def matrix(self, in_shape: tuple[int, int], seed: int = 0) -> np.ndarray:
        """The 2×3 output → input pixel map that the loader applies to one sample (after the resize), for
        ``cv2.WARP_INVERSE_MAP``.

        Args:
            in_shape: (H, W) of the (resized) input slices.
            seed: the sample's seed (see :func:`sample_seed`); only used when augmenting.
        """
        return self.draw(in_shape, seed)[0][:2]

    def device_theta(self, plane_shape: tuple[int, int], seed: int = 0) -> np.ndarray:
        """The sample's shift-scale-rotate as a ``torch.nn.functional.affine_grid`` ``theta`` (2, 3), for
        ``affine_on_device`` (identity when not drawn, or when the affine is applied by the loader).

        Args:
            plane_shape: (H, W) of the slices given to :meth:`slices` (before the resize).
            seed: the sample's seed, as given to :meth:`slices`.
        """
        in_shape = (self.resize, self.resize) if self.resize else plane_shape
        m = self.draw(in_shape, seed)[1]
        h, w = (self.size, self.size) if self.size else in_shape
        if m is None:
            return np.eye(3)[:2].astype(np.float32)
        # Pixel centres (x = 0 … w − 1) → the normalised coordinates of align_corners=False (−1 … 1 at the edges).
        to_norm = np.array([[2.0 / w, 0.0, 1.0 / w - 1.0], [0.0, 2.0 / h, 1.0 / h - 1.0], [0.0, 0.0, 1.0]])
        return (to_norm @ m @ np.linalg.inv(to_norm))[:2].astype(np.float32)

    def draw(self, in_shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        # The loader asks twice per sample (slices, then device_theta): keep the last draw.
        key = (tuple(in_shape), seed)
        if self._last_draw is None or self._last_draw[0] != key:
            self._last_draw = (key, self._draw(in_shape, seed))
        return self._last_draw[1]

    def _draw(self, in_shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The sample's random geometry: (loader map, device affine), both 3×3 output → input pixel maps.

        The loader map composes the crop, the shift-scale-rotate (unless ``affine_on_device``) and the flips; the
        device affine is the shift-scale-rotate when ``affine_on_device`` draws one, else None. Moving the affine
        after the flips does not change its distribution (rotation, shift and zoom ranges are symmetric).
        """
        h, w = in_shape
        oh, ow = (self.size, self.size) if self.size else (h, w)
        rng = np.random.default_rng([seed, 3]) if self.cfg is not None else None
        # Crop: offset of the output window in the input; a window larger than the input is centred (air around).
        if rng is not None:
            oy = int(rng.integers(0, h - oh + 1)) if h >= oh else (h - oh) // 2
            ox = int(rng.integers(0, w - ow + 1)) if w >= ow else (w - ow) // 2
        else:
            oy, ox = (h - oh) // 2, (w - ow) // 2
        m = _translate(ox, oy)
        device = None
        c = self.cfg
        if c is not None and rng is not None:
            u = rng.random(6)
            if u[0] < c.affine:
                scale = rng.uniform(1 - c.scale, 1 + c.scale)
                angle = rng.uniform(-c.rotate, c.rotate)
                shift = rng.uniform(-c.shift, c.shift, 2) * (ow, oh)
                aff = affine_matrix((oh, ow), scale, angle, (float(shift[0]), float(shift[1])))
                if c.affine_on_device:
                    device = aff
                else:
                    m = m @ aff
            square = oh == ow  # transpose and quarter turns keep the shape only of a square output
            quarter = 1 + int(u[5] / c.rot90 * 3) % 3 if u[4] < c.rot90 and square else 0
            m = m @ dihedral_matrix(oh, u[1] < c.hflip, u[2] < c.vflip, bool(u[3] < c.transpose and square), quarter)
        return m, device

    @property
    def on_device(self) -> bool:
        """Whether items carry a shift-scale-rotate for the training device (``affine_on_device``)."""
        return self.cfg is not None and self.cfg.affine_on_device and self.cfg.affine > 0

    def slices(self, planes: Sequence[np.ndarray] | np.ndarray, seed: int = 0) -> Iterator[np.ndarray]:
        """Transform a stack of HU slices one slice at a time.

        The loader windows each slice as it comes out (:class:`~rsna19.data.datasets.SliceDataset`): the slice
        is converted, warped and windowed while it is still in the CPU cache, which on a 2-core VM is worth more
        than any change of the warp itself.

        Args:
            planes: S slices (H, W), any numeric dtypes (e.g. memory-mapped int16 planes), or an (S, H, W) array.
            seed: the sample's seed (see :func:`sample_seed`); only used when augmenting.

        Yields:
            S float32 (h, w) slices in order, each in a buffer this object reuses for the next one.
        """
        planes = [np.asarray(p) for p in planes]
        h, w = planes[0].shape
        size = (self.resize, self.resize) if self.resize else (h, w)
        oh, ow = (self.size, self.size) if self.size else size
        m = self.matrix(size, seed)
        # A map that only permutes whole pixels (crop, flips, transpose) inside the slice is a numpy view: one
        # strided copy per slice, which also converts to float32. Otherwise one warp: nearest neighbour when the
        # map is still whole pixels (exact; with air around), linear for a shift-scale-rotate.
        index = pixel_view(m, (oh, ow), size)
        flags = (cv2.INTER_NEAREST if moves_whole_pixels(m) else cv2.INTER_LINEAR) | cv2.WARP_INVERSE_MAP
        dst = self._buffer("out", (oh, ow))
        for p in planes:
            if self.resize:
                p = cv2.resize(self._float(p), size[::-1], dst=self._buffer("resized", size), interpolation=_AREA)
            if index is not None:
                rows, cols, transposed = index
                view = p[rows, cols]
                np.copyto(dst, view.T if transposed else view)
            else:
                # float32 input: OpenCV's linear warp of int16 is ~4× slower than converting first.
                cv2.warpAffine(
                    self._float(p),
                    m,
                    (ow, oh),
                    dst=dst,
                    flags=flags,
                    borderMode=cv2.BORDER_CONSTANT,
                    borderValue=float(AIR_HU),
                )
            yield dst

    def __call__(self, planes: Sequence[np.ndarray] | np.ndarray, seed: int = 0) -> np.ndarray:
        """Transform a stack of HU slices (see :meth:`slices`).

        Returns:
            (S, h, w) float32 HU, a new array.
        """
        return np.stack([s.copy() for s in self.slices(planes, seed)])

    def _float(self, plane: np.ndarray) -> np.ndarray:
        """``plane`` as float32, through a kept buffer (a fresh 640 kB array per slice costs page faults)."""
        if plane.dtype == np.float32:
            return plane
        buf = self._buffer("float", plane.shape)
        np.copyto(buf, plane)
        return buf


class PixelAugment:
    """The ``extra`` albumentations transforms of an :class:`AugmentConfig`, on windowed images.

    Only pixel-level transforms (``A.ImageOnlyTransform``) are accepted: the geometry is :class:`StackAugment`'s,
    and masks of segmentation-aided models must keep matching the image. The slices and windows of a sample are the
    channels of one image, so a transform that draws once per image (brightness, blur) treats them alike, and one
    that draws per pixel (noise) draws for every channel. Float images are expected in ``[0, 1]``, so a float32
    CDF channel (``[-1, 1]``) would be clipped by some transforms: use ``image_dtype: uint8`` with it.

    Args:
        cfg: the augmentation settings; their ``extra`` specs, each ``{"name": <albumentations class>, **arguments}``
            (None or ``enabled=False``: nothing).
        train: only training applies them.

    Raises:
        UserError: an unknown name, a geometric transform, or arguments the transform rejects.
    """

    def __init__(self, cfg: AugmentConfig | None, train: bool) -> None:
        self.compose: A.Compose | None = None
        specs = cfg.extra if cfg is not None and cfg.enabled else []
        if not train or not specs:
            return
        transforms = []
        for i, spec in enumerate(specs):
            args = dict(spec)
            name = args.pop("name", None)
            cls = getattr(A, str(name), None)
            if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
                raise UserError(f"data.augment.extra[{i}]: {name!r} is not an albumentations transform")
            if not issubclass(cls, A.ImageOnlyTransform):
                raise UserError(
                    f"data.augment.extra[{i}]: {name} is not a pixel-level transform (the geometry is set by "
                    "hflip / vflip / transpose / rot90 / affine)"
                )
            try:
                transforms.append(cls(**args))
            except (TypeError, ValueError) as exc:
                raise UserError(f"data.augment.extra[{i}]: {name}: {exc}") from None
        self.compose = A.Compose(transforms, seed=0)

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        """Augment ``image`` (..., H, W), float32 in ``[0, 1]`` or uint8; returns the same shape and dtype."""
        if self.compose is None:
            return image
        shape = image.shape
        hwc = np.ascontiguousarray(image.reshape(-1, *shape[-2:]).transpose(1, 2, 0))
        self.compose.set_random_seed(seed)
        out = np.asarray(self.compose(image=hwc)["image"], dtype=image.dtype).reshape(hwc.shape)
        return np.ascontiguousarray(out.transpose(2, 0, 1)).reshape(shape)


def device_affine(x: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Apply per-sample shift-scale-rotates (from :meth:`StackAugment.device_theta`) to a batch on its device.

    Args:
        x: (B, ..., H, W) float images; all channels of a sample get its transform.
        theta: (B, 2, 3) ``affine_grid`` matrices (output → input, normalised, ``align_corners=False``).
        fill: what comes from outside the image, per channel: a scalar, or (B, ...) matching ``x`` without H, W
            (the mapped value of air).

    Returns:
        the transformed batch, shape of ``x``, bilinear.
    """
    b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    flat = x.reshape(b, -1, h, w)
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    if isinstance(fill, torch.Tensor):
        fill = fill.to(device=x.device, dtype=x.dtype).reshape(b, -1, 1, 1)
    # grid_sample pads with zeros: sample (x − fill) and add fill back, so the padding is air in every channel.
    out = F.grid_sample(flat - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
    return out.reshape(x.shape)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one sample's augmentation, independent of worker and order."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])
