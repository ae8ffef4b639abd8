"""A 3D head phantom and hemorrhage objects, as analytic functions of patient-space coordinates (LPS mm).

The head is built in its own frame ``q = R (p − centre)`` (x to the patient's left, y posterior, z superior)
around an inner-skull ellipsoid. Layers are placed by ``δ``, a first-order signed distance (mm) to that
ellipsoid (negative inside): brain, a thin subarachnoid CSF rim, skull (dense tables, lighter diploë), scalp.
Grey/white contrast, sulci, the interhemispheric fissure, deep grey nuclei and the ventricles live inside.
A headrest and the table are fixed to patient space under the head (supine: posterior is +y).

Bleeds are 3D objects with subtype-typical shape and place; each gives a boolean mask for any
set of points, so a series sampled at its true (possibly tilted) geometry images the same anatomy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rsna19.core.constants import SUBTYPES

if TYPE_CHECKING:
    from rsna19.synth.mimics import Mimics

#: Bit of each subtype in the per-voxel masks: bit c is set where ``SUBTYPES[c]`` covers the voxel.
SUBTYPE_BIT: dict[str, int] = {name: 1 << c for c, name in enumerate(SUBTYPES)}

_EPS = 1e-9


def rotation_matrix(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """(3, 3) rotation: about z (yaw), then x (pitch), then y (roll); rows are the rotated frame's axes."""
    a, b, c = (math.radians(v) for v in (yaw_deg, pitch_deg, roll_deg))
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    ry = np.array([[math.cos(c), 0, math.sin(c)], [0, 1, 0], [-math.sin(c), 0, math.cos(c)]])
    return ry @ rx @ rz


@dataclass(frozen=True)
class HeadParams:
    """One patient's head, headrest and table.

    Attributes:
        centre: centre of the inner-skull ellipsoid (LPS mm).
        angles: (yaw, pitch, roll) of the head in degrees.
        axes: inner-skull semi-axes (x, y, z) in mm.
        skull_mm, scalp_mm: thickness of bone and scalp.
        grey_hu, white_hu, csf_hu, scalp_hu: tissue values.
        ventricle_scale: size of the ventricular system (atrophy makes it larger).
        sulci: (K, 5) rows (vx, vy, vz, frequency, phase) of the random field whose zero set draws the sulci.
        texture: (3, 4) rows (wx, wy, wz, phase) of a ±1.5 HU low-frequency brain texture.
        min_feature_mm: smallest width of thin CSF structures, matched to the pixel spacing so that a coarse
            series still images sulci and the subarachnoid rim.
        headrest_radius: inner radius of the headrest cradle (a cylinder along z).
    """

    centre: tuple[float, float, float]
    angles: tuple[float, float, float]
    axes: tuple[float, float, float]
    skull_mm: float
    scalp_mm: float
    grey_hu: float
    white_hu: float
    csf_hu: float
    scalp_hu: float
    ventricle_scale: float
    sulci: tuple[tuple[float, ...], ...]
    texture: tuple[tuple[float, ...], ...]
    min_feature_mm: float = 1.0
    headrest_radius: float = 95.0
    rotation: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotation", rotation_matrix(*self.angles))

    # -- geometry helpers -------------------------------------------------------------------------------------

    def to_head(self, pts: np.ndarray) -> np.ndarray:
        """(..., 3) patient points → (..., 3) head-frame coordinates."""
        return (pts - np.asarray(self.centre)) @ self.rotation.T

    def signed_distance(self, pts: np.ndarray) -> np.ndarray:
        """(...,) approximate signed distance (mm) to the inner skull; negative inside."""
        return _ellipsoid_distance(self.to_head(pts), np.asarray(self.axes))

    def inward_normal(self, point: np.ndarray) -> np.ndarray:
        """(3,) unit normal of the inner skull pointing into the head, at (or near) ``point``."""
        q = self.to_head(np.asarray(point, dtype=np.float64))
        grad = self.rotation.T @ (q / np.asarray(self.axes) ** 2)
        return -grad / (np.linalg.norm(grad) + _EPS)

    def surface_point(self, start: np.ndarray, direction: np.ndarray) -> np.ndarray:
        """(3,) where the ray ``start + t·direction`` (start inside the head) meets the inner skull."""
        lo, hi = 0.0, 400.0
        for _ in range(60):
            mid = (lo + hi) / 2
            if self.signed_distance(start + mid * direction) < 0:
                lo = mid
            else:
                hi = mid
        return start + lo * direction

    @property
    def outer_extent(self) -> np.ndarray:
        """(3,) semi-axes of the scalp's outer surface."""
        return np.asarray(self.axes) + self.skull_mm + self.scalp_mm

    # -- sampling ---------------------------------------------------------------------------------------------

    def fields(self, pts: np.ndarray) -> HeadFields:
        """Evaluate the anatomy at ``pts`` ((M, 3) patient points)."""
        q = self.to_head(pts)
        axes = np.asarray(self.axes)
        delta = _ellipsoid_distance(q, axes)
        rim = max(1.5, 0.6 * self.min_feature_mm)
        inside = delta <= 0
        brain = delta <= -rim
        m = len(q)
        # Everything below lives inside the skull: evaluate it on those points only (about half a slice).
        idx = np.flatnonzero(inside)
        qi, di = q[idx], delta[idx]
        u = qi / axes
        rho = _norm3(u)
        unit = u / (rho[:, None] + _EPS)
        # Sulci: the zero set of a smooth random field on the sphere of directions, drawn with a constant
        # width in mm (|g| / |∇g| is the distance to the zero set) and a depth of ~12 mm under the rim.
        waves = np.asarray(self.sulci)
        arg = unit @ waves[:, :3].T * waves[:, 3] + waves[:, 4]
        g = np.cos(arg).sum(axis=1)
        grad = -(np.sin(arg) * waves[:, 3]) @ waves[:, :3]
        grad_tan = grad - _dot3(grad, unit)[:, None] * unit
        radius_mm = rho * axes.mean()
        dist_mm = np.abs(g) / (_norm3(grad_tan) + _EPS) * radius_mm
        half_width = max(1.0, 0.45 * self.min_feature_mm)
        bi = di <= -rim
        sulci = bi & (di > -(rim + 12.0)) & (dist_mm < half_width)
        fissure = bi & (np.abs(qi[:, 0]) < half_width) & (qi[:, 2] > -0.15 * axes[2])
        sub_csf = np.zeros(m, dtype=bool)
        sub_csf[idx] = (~bi) | sulci | fissure

        # Ventricles and deep grey nuclei: only points in a box around them can be inside.
        s = self.ventricle_scale
        near = (np.abs(qi[:, 0]) < 35 * s) & (qi[:, 1] > -30 * s) & (qi[:, 1] < 35 * s)
        near &= (qi[:, 2] > -12 * s) & (qi[:, 2] < 26 * s)
        jdx = idx[near]
        qv = q[jdx]
        vent = np.zeros(len(jdx), dtype=np.int8)  # 0 none, 1 right, 2 left, 3 third ventricle
        for side, code in ((-1.0, 1), (1.0, 2)):
            body = _in_ellipsoid(qv, (side * 7 * s, -6.0, 14.0), (4.5 * s, 20 * s, 7 * s), yaw_deg=side * 12)
            atrium = _in_ellipsoid(qv, (side * 15 * s, 18 * s, 8.0), (6 * s, 11 * s, 9 * s), yaw_deg=-side * 20)
            vent[body | atrium] = code
        vent[_in_ellipsoid(qv, (0.0, 2.0, 0.0), (1.8 * s, 10 * s, 7 * s))] = 3
        grey = np.zeros(len(jdx), dtype=bool)
        for side in (-1.0, 1.0):
            grey |= _in_ellipsoid(qv, (side * 17 * s, -2.0, 4.0), (8.0, 14.0, 9.0), yaw_deg=side * 10)
        vent_side = np.zeros(m, dtype=np.int8)
        vent_side[jdx] = vent
        deep_grey = np.zeros(m, dtype=bool)
        deep_grey[jdx] = grey

        return HeadFields(
            q=q, delta=delta, inside=inside, brain=brain & (vent_side == 0), sub_csf=sub_csf,
            vent_side=vent_side, deep_grey=deep_grey, rim=rim,
        )  # fmt: skip

    def tissue_hu(self, pts: np.ndarray, f: HeadFields) -> np.ndarray:
        """(M,) float32 HU of the healthy anatomy (no noise) at ``pts``."""
        hu = np.full(len(pts), -1000.0)
        self._headrest(pts, hu)
        d = f.delta
        skull = self.skull_mm
        hu[d <= skull + self.scalp_mm] = self.scalp_hu
        bone = (d > 0) & (d <= skull)
        x = d[bone] / skull
        hu[bone] = 1500.0 - 800.0 * np.sin(np.pi * x) ** 2  # dense inner/outer tables, lighter diploë
        hu[f.inside] = self.csf_hu
        par = np.flatnonzero(f.brain & ~f.sub_csf)
        cortex = f.delta[par] > -(f.rim + 4.0)
        brain_hu = np.where(cortex | f.deep_grey[par], self.grey_hu, self.white_hu)
        tex = np.asarray(self.texture)
        hu[par] = brain_hu + 1.5 * np.sin(f.q[par] @ tex[:, :3].T + tex[:, 3]).mean(axis=1)
        return hu

    def _headrest(self, pts: np.ndarray, hu: np.ndarray) -> None:
        """Paint the cradle (foam pad + plastic shell) and the table under the head, in patient space."""
        back = self.centre[1] + self.outer_extent[1]
        # Thin parts get at least ~1.5 pixels so that coarse series still show them after the blur.
        pad, shell, table = (max(v, 1.5 * self.min_feature_mm) for v in (6.0, 5.0, 8.0))
        axis_y = back + pad - self.headrest_radius
        r = np.hypot(pts[:, 0] - self.centre[0], pts[:, 1] - axis_y)
        lower = pts[:, 1] > axis_y + 0.35 * self.headrest_radius
        inner = self.headrest_radius - pad
        hu[lower & (r >= inner) & (r < self.headrest_radius)] = -150.0
        hu[lower & (r >= self.headrest_radius) & (r < self.headrest_radius + shell)] = 120.0
        table_y = axis_y + self.headrest_radius + shell + 4.0
        hu[(pts[:, 1] >= table_y) & (pts[:, 1] < table_y + table)] = 250.0


@dataclass(frozen=True)
class HeadFields:
    """Anatomy evaluated at M points (all arrays (M,) unless noted)."""

    q: np.ndarray  # (M, 3) head-frame coordinates
    delta: np.ndarray  # signed distance to the inner skull, mm
    inside: np.ndarray  # intracranial
    brain: np.ndarray  # parenchyma region (incl. sulci/fissure, excl. ventricles and rim)
    sub_csf: np.ndarray  # subarachnoid CSF: rim under the skull, sulci, interhemispheric fissure
    vent_side: np.ndarray  # 0 none, 1 right lateral, 2 left lateral, 3 third ventricle
    deep_grey: np.ndarray
    rim: float  # thickness of the subarachnoid rim, mm


# -- bleeds ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SurfaceBleed:
    """A bleed against the inner skull: epidural lens, subdural crescent or subarachnoid patch.

    Attributes:
        subtype: ``epidural``, ``subdural`` or ``subarachnoid``.
        hu: blood density.
        anchor: (3,) point on the inner skull (LPS mm).
        normal: (3,) inward unit normal of the skull at ``anchor``.
        radius: lateral extent along the skull (mm).
        thickness: largest depth into the head (mm); for subarachnoid blood, the depth of the sulci reached.
    """

    subtype: str
    hu: float
    anchor: tuple[float, float, float]
    normal: tuple[float, float, float]
    radius: float
    thickness: float

    def mask(self, pts: np.ndarray, f: HeadFields) -> np.ndarray:
        """(M,) bool: points covered by the bleed."""
        d = pts - np.asarray(self.anchor)
        t = d @ np.asarray(self.normal)
        r2 = np.maximum(_dot3(d, d) - t * t, 0.0)
        depth = -f.delta
        near = (t < self.radius) & (r2 < self.radius**2) & f.inside  # t bound: never the far side of the head
        frac = np.clip(1.0 - r2 / self.radius**2, 0.0, 1.0)
        if self.subtype == "epidural":  # biconvex: the skull on one side, a paraboloid bulging into the brain
            return near & (depth < self.thickness * frac)
        if self.subtype == "subdural":  # thin crescent following the skull, tapering at its ends
            return near & (depth < self.thickness * np.sqrt(frac))
        if self.subtype == "subarachnoid":  # blood filling the CSF spaces (rim, sulci, fissure) of a region
            return f.sub_csf & (np.sqrt(r2 + t * t) < self.radius) & (depth < f.rim + self.thickness)
        raise ValueError(f"not a surface bleed: {self.subtype}")


@dataclass(frozen=True)
class BlobBleed:
    """An intraparenchymal hematoma: a lumpy ellipsoid in the brain with a hypodense edema rim.

    Attributes:
        hu: blood density.
        centre: (3,) LPS mm.
        radii: (3,) semi-axes in mm.
        angles: orientation (yaw, pitch, roll) in degrees.
        lumps: (4,) amplitude and three phases of the surface irregularity.
    """

    hu: float
    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    angles: tuple[float, float, float]
    lumps: tuple[float, float, float, float]
    subtype: str = "intraparenchymal"

    def _rho(self, pts: np.ndarray) -> np.ndarray:
        e = (pts - np.asarray(self.centre)) @ rotation_matrix(*self.angles).T / np.asarray(self.radii)
        rho = _norm3(e)
        unit = e / (rho[:, None] + _EPS)
        amp, p1, p2, p3 = self.lumps
        lump = 1.0 + amp * np.sin(3 * unit[:, 0] + p1) * np.cos(2 * unit[:, 1] + p2) * np.cos(2 * unit[:, 2] + p3)
        return rho / lump

    def mask(self, pts: np.ndarray, f: HeadFields) -> np.ndarray:
        """(M,) bool: points covered by the hematoma."""
        return (self._rho(pts) < 1.0) & f.inside & (f.delta < -f.rim)

    def edema(self, pts: np.ndarray, f: HeadFields) -> np.ndarray:
        """(M,) bool: the oedematous rim around the hematoma (not blood, not labelled)."""
        rho = self._rho(pts)
        return (rho >= 1.0) & (rho < 1.35) & f.brain


@dataclass(frozen=True)
class VentricleBleed:
    """Intraventricular blood layering in the dependent (posterior) part of the ventricles.

    Attributes:
        hu: blood density.
        level_y: patient-space y (LPS, posterior positive) above which blood settles; ``-inf`` casts the
            whole ventricle.
        sides: ventricle codes that bleed (1 right lateral, 2 left lateral, 3 third ventricle).
    """

    hu: float
    level_y: float
    sides: tuple[int, ...]
    subtype: str = "intraventricular"

    def mask(self, pts: np.ndarray, f: HeadFields) -> np.ndarray:
        """(M,) bool: ventricle voxels filled with blood."""
        return np.isin(f.vent_side, self.sides) & (pts[:, 1] > self.level_y)


Bleed = SurfaceBleed | BlobBleed | VentricleBleed


def render(
    head: HeadParams, bleeds: list[Bleed] | tuple[Bleed, ...], pts: np.ndarray, mimics: Mimics | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Sample the phantom at arbitrary points.

    Args:
        head: the patient's head.
        bleeds: hemorrhages painted over the anatomy, in order.
        pts: (..., 3) LPS points in mm (e.g. a slice's pixel centres, (rows, cols, 3)).
        mimics: non-blood hyperdensities painted under the bleeds and streak artifacts added over them; never
            in the mask (None: none).

    Returns:
        hu: (...) float32 noiseless Hounsfield units.
        mask: (...) uint8, bit ``c`` set where ``SUBTYPES[c]`` covers the point.
    """
    shape = pts.shape[:-1]
    flat = pts.reshape(-1, 3).astype(np.float64)
    f = head.fields(flat)
    hu = head.tissue_hu(flat, f)
    if mimics is not None:
        mimics.paint_tissue(f, np.asarray(head.axes), hu)
    mask = np.zeros(len(flat), dtype=np.uint8)
    for bleed in bleeds:
        if isinstance(bleed, BlobBleed):
            hu[bleed.edema(flat, f)] -= 8.0
        m = bleed.mask(flat, f)
        hu[m] = bleed.hu
        mask[m] |= SUBTYPE_BIT[bleed.subtype]
    if mimics is not None:
        mimics.paint_artifacts(f, hu)
    return hu.reshape(shape).astype(np.float32), mask.reshape(shape)


def _ellipsoid_distance(q: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """First-order signed distance (ρ − 1)/|∇ρ| to the ellipsoid |q/axes| = 1; exact on the surface."""
    rho = _norm3(q / axes)
    grad = _norm3(q / axes**2) / (rho + _EPS)
    return (rho - 1.0) / (grad + _EPS)


def _in_ellipsoid(
    q: np.ndarray, centre: tuple[float, float, float], radii: tuple[float, float, float], yaw_deg: float = 0.0
) -> np.ndarray:
    """(M,) bool: head-frame points inside an ellipsoid rotated by ``yaw_deg`` about z."""
    d = q - np.asarray(centre)
    if yaw_deg:
        d = d @ rotation_matrix(yaw_deg, 0.0, 0.0).T
    e = d / np.asarray(radii)
    return _dot3(e, e) <= 1.0


def _dot3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of (..., 3) arrays (explicit: much faster than a reduction over a length-3 axis)."""
    return a[..., 0] * b[..., 0] + a[..., 1] * b[..., 1] + a[..., 2] * b[..., 2]


def _norm3(a: np.ndarray) -> np.ndarray:
    """Row-wise Euclidean norm of a (..., 3) array."""
    return np.sqrt(_dot3(a, a))
