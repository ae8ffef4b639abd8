"""Acquisition augmentations in HU: reconstruction kernel, dose noise, HU calibration (docs/architecture.md,
"Model inputs"; docs/benchmarks.md, "Scanner shift").

What another scanner changes inside the head, drawn once per training sample (the same for every slice of a 2.5D
or 3D sample, as a scanner treats a whole series alike) and applied to each HU slice after the geometry and before
the windows:

1. **kernel**: an unsharp mask ``hu + a · (hu − G_σ * hu)`` with ``a`` uniform in ``data.augment.sharpen``
   (``a < 0`` blurs, ``a = −1`` is the Gaussian itself, ``a > 0`` sharpens as a bone-leaning kernel does, with its
   bright rim inside the skull); σ = ``kernel_sigma`` output pixels;
2. **dose noise**: white Gaussian noise of SD uniform in ``[0, noise_sd]`` HU, drawn per slice;
3. **HU calibration**: ``hu · s + o`` with gain ``s`` uniform in ``[1 − hu_scale, 1 + hu_scale]`` and offset ``o``
   uniform in ``[−hu_offset, hu_offset]`` HU.

Each of the three is applied with probability ``intensity_p``. With ``data.hu_reference: brain``
(:mod:`rsna19.data.reference`) the offset of a whole series is removed by construction; the offset jitter then
teaches the network to tolerate what the reference leaves (an estimate a few tenths of an HU off, a gain that
moves blood against brain).

The draws come from a generator seeded with the sample's seed (:func:`rsna19.data.augment.sample_seed`), so they
are reproducible and independent of the loader worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rsna19.core.cv2_threads import cv2
from rsna19.core.errors import UserError


@dataclass(frozen=True)
class IntensityDraw:
    """One sample's acquisition change (identity values mean "not drawn")."""

    sharpen: float = 0.0
    noise_sd: float = 0.0
    scale: float = 1.0
    offset: float = 0.0
    noise_seed: int = 0

    @property
    def identity(self) -> bool:
        """True when nothing changes the pixels."""
        return self.sharpen == 0.0 and self.noise_sd == 0.0 and self.scale == 1.0 and self.offset == 0.0


class IntensityAugment:
    """Draws and applies :class:`IntensityDraw` from the ``intensity`` fields of an augmentation config.

    Args:
        cfg: an :class:`~rsna19.data.augment.AugmentConfig` (duck-typed: ``enabled``, ``intensity_p``,
            ``sharpen``, ``kernel_sigma``, ``noise_sd``, ``hu_scale``, ``hu_offset``); None or disabled: nothing.
        train: only training augments.

    Raises:
        UserError: a range that is not two increasing numbers, or a negative SD, gain or offset range.
    """

    def __init__(self, cfg: object | None, train: bool) -> None:
        self.active = False
        self._noise: dict[tuple[int, ...], np.ndarray] = {}
        if cfg is None or not train or not getattr(cfg, "enabled", False):
            return
        self.p = float(getattr(cfg, "intensity_p", 0.0))
        sharpen = list(getattr(cfg, "sharpen", [0.0, 0.0]))
        if len(sharpen) != 2 or sharpen[0] > sharpen[1] or sharpen[0] < -1.0:
            raise UserError(f"data.augment.sharpen must be [low, high] with -1 <= low <= high, got {sharpen}")
        self.sharpen = (float(sharpen[0]), float(sharpen[1]))
        self.sigma = float(getattr(cfg, "kernel_sigma", 1.0))
        self.noise_sd = float(getattr(cfg, "noise_sd", 0.0))
        self.hu_scale = float(getattr(cfg, "hu_scale", 0.0))
        self.hu_offset = float(getattr(cfg, "hu_offset", 0.0))
        for name in ("noise_sd", "hu_scale", "hu_offset"):
            if getattr(self, name) < 0:
                raise UserError(f"data.augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.sigma <= 0:
            raise UserError(f"data.augment.kernel_sigma must be > 0, got {self.sigma}")
        has_range = self.sharpen != (0.0, 0.0) or self.noise_sd > 0 or self.hu_scale > 0 or self.hu_offset > 0
        self.active = self.p > 0 and has_range

    def draw(self, seed: int) -> IntensityDraw | None:
        """The acquisition change of the sample with augmentation seed ``seed`` (None: leave its pixels)."""
        if not self.active:
            return None
        rng = np.random.default_rng([seed, 7])
        u = rng.random(4)
        sharpen = float(rng.uniform(*self.sharpen)) if u[0] < self.p else 0.0
        noise = float(rng.uniform(0.0, self.noise_sd)) if u[1] < self.p else 0.0
        scale = float(rng.uniform(1.0 - self.hu_scale, 1.0 + self.hu_scale)) if u[2] < self.p else 1.0
        offset = float(rng.uniform(-self.hu_offset, self.hu_offset)) if u[3] < self.p else 0.0
        d = IntensityDraw(sharpen, noise, scale, offset, int(rng.integers(2**31)))
        return None if d.identity else d

    def apply(self, hu: np.ndarray, d: IntensityDraw, k: int) -> np.ndarray:
        """Apply ``d`` to slice ``k`` of the sample, in place.

        Args:
            hu: (h, w) float32 HU, writable.
            d: the sample's draw.
            k: the slice's position in the sample (seeds its noise).

        Returns:
            ``hu``.
        """
        if d.noise_sd > 0:
            # OpenCV's generator (thread-local, reseeded per slice): ~4x faster than numpy's normal draws.
            noise = self._noise.get(hu.shape)
            if noise is None:
                noise = self._noise[hu.shape] = np.empty(hu.shape, dtype=np.float32)
            cv2.setRNGSeed((d.noise_seed + 7919 * k) % 2**31)
            cv2.randn(noise, 0.0, d.noise_sd)
            hu += noise
        if d.sharpen != 0.0:
            blurred = cv2.GaussianBlur(hu, (0, 0), self.sigma, borderType=cv2.BORDER_REPLICATE)
            # hu + a·(hu − blurred) = (1 + a)·hu − a·blurred
            cv2.addWeighted(hu, 1.0 + d.sharpen, blurred, -d.sharpen, 0.0, dst=hu)
        if d.scale != 1.0 or d.offset != 0.0:
            cv2.addWeighted(hu, d.scale, hu, 0.0, d.offset, dst=hu)
        return hu


def prepare_slice(hu: np.ndarray, offset: float, aug: IntensityAugment | None, d: IntensityDraw | None, k: int) -> None:
    """Reference and augment one (h, w) float32 HU slice in place: subtract the series' ``offset``
    (:class:`rsna19.data.reference.SeriesReference`), then apply the draw ``d`` (if any) as slice ``k``."""
    if offset != 0.0:
        hu -= np.float32(offset)
    if aug is not None and d is not None:
        aug.apply(hu, d, k)
