"""Slice geometries of a synthetic CT series, gantry tilt included (DICOM LPS, millimetres).

Conventions (shared with the converter, docs/architecture.md, "Conversion"):

* pixel (row i, col j) of a slice lies at ``IPP + j·Δc·rowcos + i·Δr·colcos`` with PixelSpacing = (Δr, Δc);
* the slice normal is ``n = rowcos × colcos`` and a slice's ``position`` is ``IPP · n``;
* gantry tilt θ: ``rowcos = (1, 0, 0)``, ``colcos = (0, cos θ, −sin θ)`` so that
  ``tilt = atan2(−col_z, col_y) = θ``, while the IPPs of successive slices move along z only (table motion):
  the stacked voxel grid is sheared, and every pixel is sampled at its true 3D position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rsna19.io.dicom_write import SliceGeometry


@dataclass(frozen=True)
class SeriesGeometry:
    """Geometry of one axial series acquired with a (possibly tilted) gantry.

    Attributes:
        rows: image rows.
        cols: image columns.
        pixel_spacing: (Δr, Δc) in mm.
        table_step: table motion between successive slices along z, mm (> 0: the series goes up).
        tilt_deg: gantry tilt θ in degrees (0 for an untilted series).
        n_slices: number of slices.
        centre: patient-space point (LPS mm) imaged at the centre pixel of slice 0.
        slice_thickness: nominal SliceThickness written to the header.
    """

    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    table_step: float
    tilt_deg: float
    n_slices: int
    centre: tuple[float, float, float]
    slice_thickness: float

    @property
    def row_cosines(self) -> np.ndarray:
        """(3,) direction of increasing column index."""
        return np.array([1.0, 0.0, 0.0])

    @property
    def col_cosines(self) -> np.ndarray:
        """(3,) direction of increasing row index; tilted about the x axis by ``tilt_deg``."""
        t = math.radians(self.tilt_deg)
        return np.array([0.0, math.cos(t), -math.sin(t)])

    @property
    def normal(self) -> np.ndarray:
        """(3,) slice normal ``rowcos × colcos``."""
        return np.cross(self.row_cosines, self.col_cosines)

    @property
    def fov_mm(self) -> float:
        """Field of view along the rows (mm); the reconstruction circle has this diameter."""
        return min(self.rows * self.pixel_spacing[0], self.cols * self.pixel_spacing[1])

    def ipp(self, k: int) -> np.ndarray:
        """(3,) ImagePositionPatient of slice ``k``: the centre pixel moves along z only."""
        dr, dc = self.pixel_spacing
        centre = np.asarray(self.centre, dtype=np.float64) + np.array([0.0, 0.0, k * self.table_step])
        return centre - (self.cols - 1) / 2 * dc * self.row_cosines - (self.rows - 1) / 2 * dr * self.col_cosines

    def position(self, k: int) -> float:
        """Slice position ``IPP · n`` of slice ``k`` (the converter's sort key)."""
        return float(self.ipp(k) @ self.normal)

    def slice_geometry(self, k: int) -> SliceGeometry:
        """The DICOM geometry of slice ``k``."""
        iop = (*self.row_cosines.tolist(), *self.col_cosines.tolist())
        return SliceGeometry(
            ipp=tuple(float(v) for v in self.ipp(k)),
            iop=tuple(float(v) for v in iop),
            pixel_spacing=(float(self.pixel_spacing[0]), float(self.pixel_spacing[1])),
            slice_thickness=float(self.slice_thickness),
        )

    def pixel_points(self, k: float) -> np.ndarray:
        """Patient-space centres of every pixel of slice ``k`` (fractional ``k`` gives an in-between plane).

        Returns:
            (rows, cols, 3) float64 LPS coordinates in mm.
        """
        dr, dc = self.pixel_spacing
        origin = self.ipp(0) + np.array([0.0, 0.0, k * self.table_step])
        i = np.arange(self.rows, dtype=np.float64)[:, None, None]
        j = np.arange(self.cols, dtype=np.float64)[None, :, None]
        return origin + j * dc * self.row_cosines + i * dr * self.col_cosines

    def slab_offsets(self, n: int) -> np.ndarray:
        """(n,) distances (mm, along the normal) of ``n`` sub-planes that split the slab into equal parts.

        The slab of a slice is ``slice_thickness`` thick and centred on its plane; each sub-plane sits at the
        middle of its part (n = 1: the plane itself).
        """
        t = self.slice_thickness
        return (np.arange(n, dtype=np.float64) + 0.5) / n * t - t / 2

    def plane_point(self, k: float, u: float, v: float) -> np.ndarray:
        """(3,) point of plane ``k`` at in-plane offset (u along rows' direction, v along columns') from centre."""
        centre = np.asarray(self.centre, dtype=np.float64) + np.array([0.0, 0.0, k * self.table_step])
        return centre + u * self.row_cosines + v * self.col_cosines

    def recon_circle(self) -> np.ndarray:
        """(rows, cols) bool: pixels inside the reconstruction circle (diameter = field of view)."""
        dr, dc = self.pixel_spacing
        y = (np.arange(self.rows) - (self.rows - 1) / 2) * dr
        x = (np.arange(self.cols) - (self.cols - 1) / 2) * dc
        return (y[:, None] ** 2 + x[None, :] ** 2) <= (self.fov_mm / 2) ** 2
