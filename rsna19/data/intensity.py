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
   uniform in ``[−hu_offset, hu_offset]`` HU;
4. **streaks** (metal, dense bone): 2–12 straight bright or dark lines through one point of the image, each of
   amplitude up to ``streak_hu`` HU, 0.5–2 output pixels wide (widening away from the point or not), fading
   with the distance from it, added inside the body (> −300 HU) of every slice of the sample.

Each of the first three is applied with probability ``intensity_p``; streaks with their own ``streak_p``, since
they are the one change that draws a bright structure (an artefact that reads as blood to a network never shown
one: docs/benchmarks.md, "Scanner shift"). With ``data.hu_reference: brain``
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
    streak_seed: int | None = None

    @property
    def identity(self) -> bool:
        """True when nothing changes the pixels."""
        return (
            self.sharpen == 0.0
            and self.noise_sd == 0.0
            and self.scale == 1.0
            and self.offset == 0.0
            and self.streak_seed is None
        )


class IntensityAugment:
    """Draws and applies :class:`IntensityDraw` from the ``intensity`` fields of an augmentation config.

    Args:
        cfg: an :class:`~rsna19.data.augment.AugmentConfig` (duck-typed: ``enabled``, ``intensity_p``,
            ``sharpen``, ``kernel_sigma``, ``noise_sd``, ``hu_scale``, ``hu_offset``, ``streak_p``, ``streak_hu``);
            None or disabled: nothing.
        train: only training augments.

    Raises:
        UserError: a range that is not two increasing numbers, or a negative SD, gain or offset range.
    """

    def __init__(self, cfg: object | None, train: bool) -> None:
        self.active = False
        self._noise: dict[tuple[int, ...], np.ndarray] = {}
        self._streaks: tuple[tuple[int, tuple[int, ...]], np.ndarray] | None = None
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
        self.streak_p = float(getattr(cfg, "streak_p", 0.0))
        self.streak_hu = float(getattr(cfg, "streak_hu", 0.0))
        for name in ("noise_sd", "hu_scale", "hu_offset", "streak_p", "streak_hu"):
            if getattr(self, name) < 0:
                raise UserError(f"data.augment.{name} must be >= 0, got {getattr(self, name)}")
        if self.sigma <= 0:
            raise UserError(f"data.augment.kernel_sigma must be > 0, got {self.sigma}")
        has_range = self.sharpen != (0.0, 0.0) or self.noise_sd > 0 or self.hu_scale > 0 or self.hu_offset > 0
        self.active = (self.p > 0 and has_range) or (self.streak_p > 0 and self.streak_hu > 0)

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
        noise_seed = int(rng.integers(2**31))
        # Streaks from their own generator: the draws above stay those of configs without them.
        streak_rng = np.random.default_rng([seed, 11])
        streak_seed = int(streak_rng.integers(2**31)) if streak_rng.random() < self.streak_p else None
        d = IntensityDraw(sharpen, noise, scale, offset, noise_seed, streak_seed)
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
        if d.streak_seed is not None:
            streaks = self._streak_map(d.streak_seed, hu.shape)
            hu += np.where(hu > BODY_HU, streaks, np.float32(0.0))
        return hu

    def _streak_map(self, seed: int, shape: tuple[int, ...]) -> np.ndarray:
        """The sample's (h, w) streaks, kept for its other slices (one metal object per sample)."""
        key = (seed, tuple(shape))
        if self._streaks is None or self._streaks[0] != key:
            self._streaks = (key, streak_map(np.random.default_rng(seed), (shape[0], shape[1]), self.streak_hu))
        return self._streaks[1]


#: Streaks are added where the slice is body (soft tissue, bone, brain), not air.
BODY_HU = -300.0


def streak_map(rng: np.random.Generator, shape: tuple[int, int], max_hu: float) -> np.ndarray:
    """Metal-like streaks: straight lines through one point, bright or dark, fading away from it.

    Args:
        rng: the draw's generator.
        shape: (h, w) of the slice.
        max_hu: the largest amplitude of a line (HU).

    Returns:
        (h, w) float32 HU to add.
    """
    h, w = shape
    size = float(min(h, w))
    # The source sits anywhere from near the centre to near the skull (fillings, clips, coils, shunt valves).
    radius, angle = rng.uniform(0.05, 0.45) * size, rng.uniform(0.0, 2 * np.pi)
    cy, cx = (h - 1) / 2 + radius * np.sin(angle), (w - 1) / 2 + radius * np.cos(angle)
    dy = np.arange(h, dtype=np.float32)[:, None] - np.float32(cy)
    dx = np.arange(w, dtype=np.float32)[None, :] - np.float32(cx)
    r = np.sqrt(dy * dy + dx * dx)
    out = np.zeros((h, w), dtype=np.float32)
    for _ in range(int(rng.integers(2, 13))):
        phi = rng.uniform(0.0, np.pi)
        amp = max_hu * rng.uniform(0.25, 1.0) * (1.0 if rng.random() < 0.5 else -1.0)
        # Constant width (a line) or widening with the distance (a wedge), in output pixels.
        width = rng.uniform(0.5, 2.0) + rng.uniform(0.0, 0.015) * r
        d = dx * np.float32(np.sin(phi)) - dy * np.float32(np.cos(phi))
        out += np.float32(amp) * np.exp(-0.5 * (d / width) ** 2)
    out *= np.exp(-r / np.float32(rng.uniform(0.3, 1.2) * size))
    return out.astype(np.float32, copy=False)


def prepare_slice(hu: np.ndarray, offset: float, aug: IntensityAugment | None, d: IntensityDraw | None, k: int) -> None:
    """Reference and augment one (h, w) float32 HU slice in place: subtract the series' ``offset``
    (:class:`rsna19.data.reference.SeriesReference`), then apply the draw ``d`` (if any) as slice ``k``."""
    if offset != 0.0:
        hu -= np.float32(offset)
    if aug is not None and d is not None:
        aug.apply(hu, d, k)
