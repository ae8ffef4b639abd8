"""What every DICOM reader of rsna19 agrees on: the tags it reads, the slice geometry and the series geometry rule.

``rsna19 index`` (:mod:`rsna19.io.dicom_header`), the converter (:mod:`rsna19.conversion.read`,
:mod:`rsna19.conversion.series`) and ``predict-study`` / ``serve`` (:mod:`rsna19.inference.inputs`) take from here:

* the tag table (:data:`TAGS`, plain int tags) and which SOP classes and ImageType values mean what;
* one gantry tilt formula (:func:`tilt_deg`: ``atan2(−col_z, col_y)`` of ImageOrientationPatient), one slice
  normal (:func:`series_normal`: ``r × c`` of the per-component median orientation of the series' slices) and one
  position (``IPP · n``);
* one geometry rule (:func:`pick_geometry`): slices agree when their image size is equal, every orientation cosine
  is within :data:`ORIENTATION_TOL` and the pixel spacings within :data:`SPACING_RTOL`; a series keeps the slices
  that agree with the geometry a strict majority of its slices agrees with, and drops the others (a damaged or
  misfiled file, a stray localizer) with a reason. Without such a majority the series has mixed geometry.

Which files a series keeps is thus decided once, the same way for training and for new studies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Tags read by value, as plain ints (the fastest dict keys).
TAGS: dict[str, int] = {
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "Modality": 0x00080060,
    "PatientID": 0x00100020,
    "SliceThickness": 0x00180050,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "InstanceNumber": 0x00200013,
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "SamplesPerPixel": 0x00280002,
    "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "PixelSpacing": 0x00280030,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "PixelRepresentation": 0x00280103,
    "WindowCenter": 0x00281050,
    "WindowWidth": 0x00281051,
    "RescaleIntercept": 0x00281052,
    "RescaleSlope": 0x00281053,
    "SharedFunctionalGroupsSequence": 0x52009229,
    "PerFrameFunctionalGroupsSequence": 0x52009230,
    "PixelData": 0x7FE00010,
}

#: CT Image Storage and its enhanced / legacy-converted variants: CT without a Modality element.
CT_SOP_CLASSES: frozenset[str] = frozenset(
    {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"}
)
#: ImageType values that mark a planning image rather than a diagnostic series.
LOCALIZER_TOKENS: frozenset[str] = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})
#: The identifiers that place a file in a study and series: key → keyword.
UID_KEYWORDS: dict[str, str] = {
    "sop_uid": "SOPInstanceUID",
    "series_uid": "SeriesInstanceUID",
    "study_uid": "StudyInstanceUID",
}

#: Largest difference of any ImageOrientationPatient cosine between slices of one series.
ORIENTATION_TOL = 0.02
#: Largest relative difference of PixelSpacing between slices of one series.
SPACING_RTOL = 1e-3


def is_ct_sop_class(sop_class: str | None) -> bool:
    """True for a CT image SOP class (accepted as CT when a file has no Modality element)."""
    return sop_class in CT_SOP_CLASSES


def tilt_deg(iop: Sequence[float] | np.ndarray) -> float | np.ndarray:
    """Gantry tilt in degrees from ImageOrientationPatient: ``atan2(−col_z, col_y)`` of the column cosines.

    Args:
        iop: (6,) one orientation, or (N, 6) several.

    Returns:
        A float for one orientation, (N,) float64 for several; ``-0.0`` comes back as ``0.0``.
    """
    iop = np.asarray(iop, dtype=np.float64)
    tilt = np.degrees(np.arctan2(-iop[..., 5], iop[..., 4])) + 0.0
    return float(tilt) if tilt.ndim == 0 else tilt


def slice_normal(iop: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit slice normal ``r × c`` of an ImageOrientationPatient: (6,) → (3,)."""
    iop = np.asarray(iop, dtype=np.float64)
    n = np.cross(iop[:3], iop[3:])
    return n / np.linalg.norm(n)


def series_orientation(iops: np.ndarray) -> np.ndarray:
    """The orientation of a series: the per-component median of its slices' (Z, 6) orientations → (6,).

    Order-independent, exact when the slices agree, and robust to a few jittered ones.
    """
    return np.median(np.asarray(iops, dtype=np.float64).reshape(-1, 6), axis=0)


def series_normal(iops: np.ndarray) -> np.ndarray:
    """Unit slice normal of a series (:func:`slice_normal` of :func:`series_orientation`): (Z, 6) → (3,)."""
    return slice_normal(series_orientation(iops))


def positions_along_normal(ipps: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Position of every slice along the series normal: (Z, 3) IPPs, (3,) normal → (Z,) ``IPP · n`` in mm."""
    return np.asarray(ipps, dtype=np.float64) @ np.asarray(normal, dtype=np.float64)


@dataclass(frozen=True)
class SliceGeometry:
    """What must agree between the slices of one series.

    Attributes:
        shape: (rows, cols).
        iop: the six ImageOrientationPatient cosines.
        spacing: PixelSpacing (Δr, Δc) in mm.
    """

    shape: tuple[int, int]
    iop: tuple[float, ...]
    spacing: tuple[float, float]

    def agrees(self, other: SliceGeometry) -> bool:
        """Same image size, orientation within :data:`ORIENTATION_TOL`, spacing within :data:`SPACING_RTOL`."""
        return (
            self.shape == other.shape
            and max(abs(a - b) for a, b in zip(self.iop, other.iop)) <= ORIENTATION_TOL
            and all(math.isclose(a, b, rel_tol=SPACING_RTOL) for a, b in zip(self.spacing, other.spacing))
        )

    def __str__(self) -> str:
        iop = ", ".join(f"{v:.3f}" for v in self.iop)
        return f"{self.shape[0]}x{self.shape[1]}, orientation ({iop}), spacing {self.spacing[0]:g}x{self.spacing[1]:g}"


def pick_geometry(geometries: Sequence[SliceGeometry]) -> tuple[list[int], list[tuple[int, str]]]:
    """The series geometry rule: keep the slices that agree with the geometry a strict majority agrees with.

    The reference is the distinct geometry that the most slices agree with (ties: the first in input order); if
    it is agreed with by more than half of the slices, every slice that does not agree with it is dropped with a
    reason. Otherwise nothing is dropped: the series has mixed geometry, for the caller to refuse.

    Args:
        geometries: one per slice.

    Returns:
        ``kept``: input indices of the kept slices, in input order; ``dropped``: ``(index, reason)`` pairs.
    """
    distinct: dict[SliceGeometry, list[int]] = {}
    for i, g in enumerate(geometries):
        distinct.setdefault(g, []).append(i)
    if len(distinct) < 2:
        return list(range(len(geometries))), []
    keys = list(distinct)
    support = [sum(len(distinct[o]) for o in keys if k.agrees(o)) for k in keys]
    best = keys[int(np.argmax(support))]
    if 2 * max(support) <= len(geometries):
        return list(range(len(geometries))), []
    kept, dropped = [], []
    for i, g in enumerate(geometries):
        if g.agrees(best):
            kept.append(i)
        else:
            dropped.append((i, f"geometry {g} differs from the rest of the series ({best})"))
    return kept, dropped
