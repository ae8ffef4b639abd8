"""The "not assessable" gate: a series the models cannot judge gets that answer, with the reasons, never a negative.

One gate for ``predict-study``, ``validate`` (which runs predict-study) and the node (which runs it too). It looks
at a series once it is converted exactly as for the models (HU volume and its meta) and before any model runs,
with the source headers at hand, and refuses it when:

* ``rescale_slope_zero``: a source image has RescaleSlope 0 (invalid: every pixel maps to the intercept);
* ``uniform``: more than half of the slices are blank or uniform (HU range under :data:`UNIFORM_RANGE_HU`);
* ``no_head``: no slice shows a head (bone, HU ≥ :data:`BONE_HU`, around brain-like tissue: see
  :func:`head_slices`);
* ``too_few_slices``: fewer slices than the widest neighbour context of the bundle's models
  (:func:`model_context`: a 2.5D model of 5 slices needs 5);
* ``coverage``: the slices showing a head cover less than :data:`COVERAGE_FRACTION` of the training series'
  median z extent (``bundle.json``'s ``training_geometry.z_extent_mm``; bundles without it skip this check and
  say so in ``checks``).

:class:`NotAssessable` carries the verdict (``studies.json``'s ``assessment``): ``{"assessable": false,
"reasons": [{"code", "message"}], "checks": {...}}``; an assessable series gets ``{"assessable": true, "reasons":
[], "checks": {...}}``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from rsna19.core.constants import AIR_HU

if TYPE_CHECKING:
    from rsna19.study.bundle import Bundle

#: A slice whose HU range (max − min) is below this is uniform (a blank or flat image).
UNIFORM_RANGE_HU: float = 1.0
#: Bone: the skull.
BONE_HU: float = 300.0
#: Brain-like soft tissue (grey and white matter, blood, CSF, scalp).
SOFT_HU: tuple[float, float] = (-20.0, 100.0)
#: A slice shows a head with at least these fractions of its pixels bone and soft tissue.
MIN_BONE_FRACTION: float = 0.005
MIN_SOFT_FRACTION: float = 0.03
#: The head's z extent must reach this fraction of the training series' median extent.
COVERAGE_FRACTION: float = 0.5
#: Layouts whose input is a slice and its neighbours (a slab or a sequence model takes any number of slices).
NEIGHBOUR_LAYOUTS: tuple[str, ...] = ("channels", "stack")


class NotAssessable(Exception):
    """A series (or study) the models cannot judge; ``verdict`` is the ``assessment`` dict."""

    def __init__(self, verdict: dict[str, Any]) -> None:
        self.verdict = verdict
        super().__init__("not assessable: " + "; ".join(r["message"] for r in verdict["reasons"]))


@dataclass(frozen=True)
class GateLimits:
    """What the gate compares a series with.

    Attributes:
        min_slices: the bundle's widest neighbour context (:func:`model_context`).
        training_z_extent_mm: median z extent of the training series, or None (coverage not checked).
        note: where the limits come from, for ``checks``.
    """

    min_slices: int = 1
    training_z_extent_mm: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def model_context(models: Sequence[Any]) -> int:
    """The widest neighbour context (``data.slices``) of the 2D/2.5D and stacked models; 1 without one.

    Args:
        models: objects with ``cfg.data.slices`` and ``cfg.data.layout`` (the bundle's predictors).
    """
    widths = [int(m.cfg.data.slices) for m in models if str(m.cfg.data.layout) in NEIGHBOUR_LAYOUTS]
    return max(widths, default=1)


def gate_limits(bundle: Bundle) -> GateLimits:
    """The limits of ``bundle``: its models' context and its training series' z extent."""
    geo = bundle.training_geometry or {}
    extent = geo.get("z_extent_mm")
    notes = () if extent else ("coverage not checked: the bundle records no training z extent (re-export it)",)
    return GateLimits(model_context(bundle.models), float(extent) if extent else None, notes)


def head_slices(volume_hu: np.ndarray) -> np.ndarray:
    """Which slices show a head: at least :data:`MIN_BONE_FRACTION` bone and :data:`MIN_SOFT_FRACTION` soft tissue.

    Args:
        volume_hu: (Z, H, W) HU.

    Returns:
        (Z,) bool.
    """
    v = np.asarray(volume_hu)
    n = float(v.shape[1] * v.shape[2]) or 1.0
    bone = (v >= BONE_HU).sum(axis=(1, 2)) / n
    soft = ((v >= SOFT_HU[0]) & (v <= SOFT_HU[1])).sum(axis=(1, 2)) / n
    return (bone >= MIN_BONE_FRACTION) & (soft >= MIN_SOFT_FRACTION)


def uniform_slices(volume_hu: np.ndarray) -> np.ndarray:
    """(Z,) bool: slices whose HU range is below :data:`UNIFORM_RANGE_HU` (blank or flat).

    The conversion pads the crop window outside the image with :data:`rsna19.core.constants.AIR_HU`; those pixels are
    left out, so a flat image is uniform whether or not the window reaches past its edge.
    """
    v = np.asarray(volume_hu, dtype=np.float64)
    flat = v.reshape(v.shape[0], -1)
    real = flat != AIR_HU
    hi = np.where(real, flat, -np.inf).max(axis=1)
    lo = np.where(real, flat, np.inf).min(axis=1)
    return ~real.any(axis=1) | ((hi - lo) < UNIFORM_RANGE_HU)


def rescale_slopes(paths: Sequence[str | os.PathLike[str]]) -> dict[str, list[float]]:
    """RescaleSlope of every source file (each frame's, for an Enhanced CT file), by path.

    A file whose header cannot be read is left out (the conversion already reported it).
    """
    import pydicom

    out: dict[str, list[float]] = {}
    for path in dict.fromkeys(os.fspath(p) for p in paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - unreadable files were dropped by the conversion with their reason
            continue
        slopes = []
        if "RescaleSlope" in ds:
            slopes.append(ds.RescaleSlope)
        for key in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            for g in ds.get(key) or []:
                for t in g.get("PixelValueTransformationSequence") or []:
                    if "RescaleSlope" in t:
                        slopes.append(t.RescaleSlope)
        values = []
        for s in slopes:
            try:
                values.append(float(s))
            except (TypeError, ValueError):
                continue
        out[path] = values
    return out


def assess_series(
    volume_hu: np.ndarray,
    meta: Mapping[str, Any],
    limits: GateLimits,
    paths: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """The gate's verdict on one converted series.

    Args:
        volume_hu: (Z, H, W) HU as the models would see it (:func:`rsna19.conversion.series.convert_series`).
        meta: its meta (``positions``, ``spacing``).
        limits: :func:`gate_limits` of the bundle.
        paths: the series' source files (their RescaleSlope is checked).

    Returns:
        ``{"assessable", "reasons": [{"code", "message"}], "checks": {"n_slices", "uniform_slices",
        "head_slices", "head_extent_mm", "min_slices", "min_extent_mm", "notes"}}``.
    """
    v = np.asarray(volume_hu)
    n = int(v.shape[0])
    reasons: list[dict[str, str]] = []
    zero = sorted(p for p, s in rescale_slopes(paths).items() if any(x == 0.0 for x in s))
    if zero:
        reasons.append(
            {
                "code": "rescale_slope_zero",
                "message": f"RescaleSlope is 0 in {len(zero)} image file(s) (e.g. {os.path.basename(zero[0])}): "
                "every pixel maps to one value, the images hold no picture (invalid DICOM)",
            }
        )
    uniform = uniform_slices(v) if n else np.zeros(0, dtype=bool)
    if n and uniform.sum() * 2 > n and not zero:
        reasons.append(
            {
                "code": "uniform",
                "message": f"{int(uniform.sum())} of {n} slices are blank or uniform (HU range < {UNIFORM_RANGE_HU:g})",
            }
        )
    head = head_slices(v) if n else np.zeros(0, dtype=bool)
    extent = head_extent_mm(meta, head)
    if not head.any() and not reasons:
        reasons.append(
            {
                "code": "no_head",
                "message": f"no head in the field of view: no slice shows skull (≥ {BONE_HU:g} HU) around "
                "brain-like tissue",
            }
        )
    if n < limits.min_slices:
        reasons.append(
            {
                "code": "too_few_slices",
                "message": f"{n} slice(s): the models read {limits.min_slices} neighbouring slices at a time",
            }
        )
    min_extent = COVERAGE_FRACTION * limits.training_z_extent_mm if limits.training_z_extent_mm else None
    if min_extent is not None and head.any() and extent < min_extent and n >= limits.min_slices:
        reasons.append(
            {
                "code": "coverage",
                "message": f"the head is covered over {extent:.1f} mm, far short of the training series' "
                f"{limits.training_z_extent_mm:.0f} mm (minimum {min_extent:.0f} mm)",
            }
        )
    return {
        "assessable": not reasons,
        "reasons": reasons,
        "checks": {
            "n_slices": n,
            "uniform_slices": int(uniform.sum()),
            "head_slices": int(head.sum()),
            "head_extent_mm": round(extent, 3),
            "min_slices": limits.min_slices,
            "min_extent_mm": None if min_extent is None else round(min_extent, 3),
            "notes": list(limits.notes),
        },
    }


def head_extent_mm(meta: Mapping[str, Any], head: np.ndarray) -> float:
    """Length along the slice normal covered by the slices showing a head (first to last plus one spacing)."""
    if not np.any(head):
        return 0.0
    pos = np.asarray(meta["positions"], dtype=np.float64)[np.asarray(head, dtype=bool)]
    return float(pos.max() - pos.min() + float(meta["spacing"][0]))


def study_assessment(verdicts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A study's verdict from its series' verdicts: not assessable when none of them is; reasons of each series."""
    if any(v["assessable"] for v in verdicts):
        return {"assessable": True, "reasons": [], "series": list(verdicts)}
    reasons: list[dict[str, str]] = []
    for v in verdicts:
        for r in v["reasons"]:
            if r not in reasons:
                reasons.append(r)
    return {"assessable": False, "reasons": reasons, "series": list(verdicts)}
