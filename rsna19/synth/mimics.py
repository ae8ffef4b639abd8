"""What makes a single head-CT slice ambiguous without being blood: hyperdense mimics and skull-base streaks.

Everything lives in the head frame of :class:`~rsna19.synth.phantom.HeadParams` (x to the patient's left,
y posterior, z superior; ``axes`` are the inner-skull semi-axes), so it follows the head through every slice
and every gantry tilt. Nothing here is ever written to the hemorrhage masks.

* **Calcifications** (100–500 HU): the glomus of the choroid plexus in the atria of the lateral ventricles,
  the pineal gland behind the third ventricle, plaques on the falx. Averaged over a 4–5 mm slab and seen
  through a brain window (40/80 saturates at 80 HU) they look like small blood clots.
* **Dense venous sinuses** (50–70 HU, a patient's haematocrit): the superior sagittal sinus, a triangle at the
  inner table along the midline, and the transverse sinuses along the posterior inner table. They sit where
  subdural and subarachnoid blood sit and have its density.
* **Beam hardening** near the skull base: two petrous ridges (dense bone) on the lowest slices and the dark band
  between them (the "Hounsfield bar"), with brighter flanks, plus oblique streaks from each ridge. The
  artifact fades within ~2 cm above the ridges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rsna19.synth.phantom import HeadFields, rotation_matrix


@dataclass(frozen=True)
class Calcification:
    """A small dense ellipsoid, head frame.

    Attributes:
        centre: (3,) head-frame mm.
        radii: (3,) semi-axes, mm.
        yaw_deg: rotation about the head's z axis.
        hu: density.
    """

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    yaw_deg: float
    hu: float

    def inside(self, q: np.ndarray) -> np.ndarray:
        """(M,) bool for (M, 3) head-frame points."""
        d = (q - np.asarray(self.centre)) @ rotation_matrix(self.yaw_deg, 0.0, 0.0).T / np.asarray(self.radii)
        return (d * d).sum(axis=1) <= 1.0


@dataclass(frozen=True)
class FalxPlaque:
    """A calcified plaque of the falx: a thin sheet on the midline, an ellipse in the sagittal plane.

    Attributes:
        y, z: centre in the sagittal plane (head frame, mm).
        half_y, half_z: semi-axes of the ellipse, mm.
        half_width: half thickness across the midline, mm.
        hu: density.
    """

    y: float
    z: float
    half_y: float
    half_z: float
    half_width: float
    hu: float

    def inside(self, q: np.ndarray) -> np.ndarray:
        """(M,) bool for (M, 3) head-frame points."""
        e = ((q[:, 1] - self.y) / self.half_y) ** 2 + ((q[:, 2] - self.z) / self.half_z) ** 2
        return (np.abs(q[:, 0]) < self.half_width) & (e <= 1.0)


@dataclass(frozen=True)
class SkullBase:
    """Petrous ridges and the beam-hardening streaks they cause.

    Attributes:
        z: head-frame height of the ridges (mm, negative: below the head centre).
        y: head-frame y of the ridges' centres.
        bone_hu: density of the ridges.
        streak_hu: depth of the dark band between the ridges (HU, > 0); the flanks rise by half of it. The
            oblique streaks fade over ~35 mm from the ridges, everything over ~6 mm above them.
        width: Gaussian half-width of a streak (mm).
        angles: directions (degrees, in the axial plane from the x axis) of the oblique streaks from each ridge.
    """

    z: float
    y: float
    bone_hu: float
    streak_hu: float
    width: float
    angles: tuple[float, ...]

    def ridges(self, q: np.ndarray) -> np.ndarray:
        """(M,) bool: points inside either petrous ridge (long thin ellipsoids pointing anteromedially)."""
        out = np.zeros(len(q), dtype=bool)
        idx = np.flatnonzero(np.abs(q[:, 2] - self.z) < 6.0)  # most slices miss the ridges: skip their points
        for side in (-1.0, 1.0):
            d = q[idx] - np.array([side * 24.0, self.y, self.z])
            d = d @ rotation_matrix(side * 35.0, 0.0, 0.0).T
            out[idx] |= ((d / np.array([19.0, 4.5, 5.5])) ** 2).sum(axis=1) <= 1.0
        return out

    def streaks(self, q: np.ndarray) -> np.ndarray:
        """(M,) additive HU of the artifact: negative in the bands, slightly positive on their flanks."""
        out = np.zeros(len(q))
        idx = np.flatnonzero((q[:, 2] > self.z - 12.0) & (q[:, 2] < self.z + 24.0))
        if not len(idx):
            return out
        q = q[idx]
        fade = np.exp(-np.maximum(q[:, 2] - self.z, 0.0) / 6.0)
        w = self.width
        # The bar between the ridges (fading beyond them), then oblique streaks from each ridge's apex that fade
        # with the distance from it: (distance to the streak's line, weight) pairs.
        lines = [(q[:, 1] - self.y, np.exp(-((np.maximum(np.abs(q[:, 0]) - 25.0, 0.0) / 10.0) ** 2)))]
        for side in (-1.0, 1.0):
            apex = np.array([side * 10.0, self.y - 6.0])
            for a in self.angles:
                t = math.radians(a)
                direction = np.array([side * math.cos(t), -math.sin(t)])
                rel = q[:, :2] - apex
                along = rel @ direction
                perp = rel @ np.array([-direction[1], direction[0]])
                lines.append((perp, np.where(along > 0, np.exp(-along / 35.0), 0.0)))
        profile = np.zeros(len(q))
        for d, weight in lines:
            core = np.exp(-(d**2) / (2 * w * w))
            flanks = 0.5 * np.exp(-((np.abs(d) - 2.5 * w) ** 2) / (2 * w * w))
            profile += weight * (flanks - core)
        out[idx] = self.streak_hu * fade * profile
        return out


@dataclass(frozen=True)
class Mimics:
    """The non-blood hyperdensities and artifacts of one study.

    Attributes:
        calcifications: choroid-plexus and pineal calcifications.
        falx: calcified falx plaques.
        sinus_hu: density of the venous sinuses (None: not painted).
        skull_base: petrous ridges and beam hardening (None: not painted).
    """

    calcifications: tuple[Calcification, ...] = ()
    falx: tuple[FalxPlaque, ...] = ()
    sinus_hu: float | None = None
    skull_base: SkullBase | None = None

    def names(self) -> list[str]:
        """Short names of what is painted (for the dataset summary)."""
        out = [f"calcification@{c.centre[0]:+.0f},{c.centre[1]:+.0f},{c.centre[2]:+.0f}" for c in self.calcifications]
        out += ["falx"] * len(self.falx)
        if self.sinus_hu is not None:
            out.append(f"dense_sinus:{self.sinus_hu:.0f}")
        if self.skull_base is not None:
            out.append("skull_base_streaks")
        return out

    def paint_tissue(self, f: HeadFields, axes: np.ndarray, hu: np.ndarray) -> None:
        """Paint sinuses, calcifications and petrous ridges into ``hu`` ((M,) healthy anatomy) in place."""
        idx = np.flatnonzero(f.inside)
        q, delta = f.q[idx], f.delta[idx]
        if self.sinus_hu is not None:
            hu[idx[_sinuses(q, delta, axes)]] = self.sinus_hu
        for plaque in self.falx:
            hu[idx[plaque.inside(q) & (q[:, 2] > -0.15 * axes[2])]] = plaque.hu
        for calc in self.calcifications:
            hu[idx[calc.inside(q)]] = calc.hu
        if self.skull_base is not None:
            hu[idx[self.skull_base.ridges(q)]] = self.skull_base.bone_hu

    def paint_artifacts(self, f: HeadFields, hu: np.ndarray) -> None:
        """Add the beam-hardening streaks to the intracranial soft tissue (and blood) of ``hu`` in place."""
        if self.skull_base is None:
            return
        idx = np.flatnonzero(f.inside)
        idx = idx[hu[idx] < 200.0]  # streaks show in soft tissue; bone stays bone
        hu[idx] += self.skull_base.streaks(f.q[idx])


def _sinuses(q: np.ndarray, delta: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """(M,) bool: superior sagittal and transverse sinuses, for intracranial head-frame points.

    Both hug the inner table (``delta`` within 5 mm of it). The sagittal sinus is a triangle, widest at the
    bone, on the midline over the vertex and down the occiput to the torcula; the transverse sinuses leave the
    torcula laterally along the posterior inner table.
    """
    depth = -delta  # ≥ 0 inside
    shell = depth < 5.0
    torcula_z = -0.3 * axes[2]
    half = 0.6 + 3.4 * (1.0 - depth / 5.0)
    sagittal = shell & (np.abs(q[:, 0]) < half) & np.where(q[:, 1] > 0, q[:, 2] > torcula_z, q[:, 2] > 0.2 * axes[2])
    transverse = shell & (depth < 4.0) & (q[:, 1] > 0.35 * axes[1]) & (np.abs(q[:, 2] - torcula_z) < 3.5)
    return sagittal | transverse


def random_mimics(rng: np.random.Generator, ventricle_scale: float, axes: tuple[float, float, float], *,
                  calcified: bool, skull_base: bool) -> Mimics:  # fmt: skip
    """Draw one study's mimics: ``calcified`` turns on calcifications and sinuses, ``skull_base`` the streaks."""
    s = ventricle_scale
    ax = np.asarray(axes)
    calcs: list[Calcification] = []
    falx: list[FalxPlaque] = []
    sinus_hu = None
    if calcified:
        # Choroid plexus: most adults, usually both sides, in the atrium of the lateral ventricle.
        if rng.random() < 0.75:
            sides = (-1.0, 1.0) if rng.random() < 0.7 else ((-1.0,) if rng.random() < 0.5 else (1.0,))
            for side in sides:
                centre = (
                    side * (15.0 * s + rng.uniform(-2, 2)),
                    18.0 * s + rng.uniform(-3, 3),
                    8.0 + rng.uniform(-3, 3),
                )
                radii = tuple(float(r) for r in rng.uniform(2.0, 4.5, 3))
                calcs.append(Calcification(tuple(float(c) for c in centre), radii, float(rng.uniform(0, 180)),
                                           float(rng.uniform(120.0, 350.0))))  # fmt: skip
        # Pineal gland, just behind the third ventricle.
        if rng.random() < 0.6:
            centre = (float(rng.uniform(-1, 1)), 12.0 * s + float(rng.uniform(1.5, 4.0)), float(rng.uniform(-1, 4)))
            radii = tuple(float(r) for r in rng.uniform(1.8, 3.5, 3))
            calcs.append(Calcification(centre, radii, 0.0, float(rng.uniform(100.0, 300.0))))
        # Falx: thin plaques on the midline, above the corpus callosum.
        for _ in range(int(rng.choice([0, 1, 2, 3], p=[0.5, 0.25, 0.15, 0.1]))):
            falx.append(
                FalxPlaque(
                    y=float(rng.uniform(-0.55, 0.55) * ax[1]), z=float(rng.uniform(0.3, 0.75) * ax[2]),
                    half_y=float(rng.uniform(6.0, 18.0)), half_z=float(rng.uniform(3.0, 9.0)),
                    half_width=float(rng.uniform(0.7, 1.3)), hu=float(rng.uniform(150.0, 500.0)),
                )
            )  # fmt: skip
        sinus_hu = float(rng.uniform(50.0, 70.0))
    base = None
    if skull_base:
        n = int(rng.integers(1, 4))
        base = SkullBase(
            z=float(-0.62 * ax[2] + rng.uniform(-3, 3)), y=float(rng.uniform(4.0, 12.0)),
            bone_hu=float(rng.uniform(1000.0, 1400.0)), streak_hu=float(rng.uniform(12.0, 30.0)),
            width=float(rng.uniform(1.5, 3.0)), angles=tuple(float(a) for a in rng.uniform(15.0, 75.0, n)),
        )  # fmt: skip
    return Mimics(calcifications=tuple(calcs), falx=tuple(falx), sinus_hu=sinus_hu, skull_base=base)
