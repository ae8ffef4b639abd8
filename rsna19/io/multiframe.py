"""Multi-frame (Enhanced CT) files as ordinary slices: per-frame geometry and rescale from the functional groups.

An Enhanced CT Image (SOP class 1.2.840.10008.5.1.4.1.1.2.1) holds a whole series in one file; what a
single-frame file says at the top level lives in functional group macros, per frame in the Per-frame Functional
Groups Sequence (5200,9230) or once for all frames in the Shared Functional Groups Sequence (5200,9229):

======================================  =====================================================
macro (sequence)                        values
======================================  =====================================================
PlanePositionSequence (0020,9113)       ImagePositionPatient
PlaneOrientationSequence (0020,9116)    ImageOrientationPatient
PixelMeasuresSequence (0028,9110)       PixelSpacing, SliceThickness
PixelValueTransformationSequence        RescaleSlope, RescaleIntercept
(0028,9145)
FrameVOILUTSequence (0028,9132)         WindowCenter, WindowWidth
======================================  =====================================================

A value is taken from the frame's own item, else from the shared item, else from the top level of the dataset
(legacy multi-frame files). The project expands such a file early into one virtual slice per frame: the index row
or slice reference is the file's path plus its 1-based ``frame`` number, and the slice's SOP UID is
:func:`frame_sop_uid` (``<SOPInstanceUID>.f<frame>``), so every later stage keys on unique slice UIDs. Single-frame
files have ``frame`` 0 and keep their SOPInstanceUID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pydicom

#: Enhanced CT Image Storage.
ENHANCED_CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2.1"
#: Separator between a file's SOPInstanceUID and the frame number in a frame's slice UID.
FRAME_UID_SEPARATOR = ".f"

_SHARED = "SharedFunctionalGroupsSequence"
_PER_FRAME = "PerFrameFunctionalGroupsSequence"


def frame_sop_uid(sop_uid: str, frame: int) -> str:
    """The slice UID of frame ``frame`` (1-based) of a multi-frame file: ``<sop_uid>.f<frame>``; 0 → ``sop_uid``."""
    return f"{sop_uid}{FRAME_UID_SEPARATOR}{int(frame)}" if frame else sop_uid


@dataclass(frozen=True)
class FrameHeader:
    """What one frame of a multi-frame file says about itself (None where the file does not say).

    Attributes:
        frame: 1-based frame number.
        ipp: ImagePositionPatient (3 values).
        iop: ImageOrientationPatient (6 values).
        pixel_spacing: PixelSpacing (row spacing, column spacing), mm.
        slice_thickness: SliceThickness, mm.
        slope, intercept: RescaleSlope, RescaleIntercept.
        window_center, window_width: the first display window.
    """

    frame: int
    ipp: list[float] | None
    iop: list[float] | None
    pixel_spacing: list[float] | None
    slice_thickness: float | None
    slope: float | None
    intercept: float | None
    window_center: float | None
    window_width: float | None


def is_multiframe(ds: pydicom.Dataset) -> bool:
    """True for a file whose geometry lives in functional groups or that holds several frames."""
    frames = ds.get("NumberOfFrames")
    try:
        n = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError):
        n = 1
    return n != 1 or _PER_FRAME in ds or _SHARED in ds


def number_of_frames(ds: pydicom.Dataset) -> int:
    """NumberOfFrames (1 where absent)."""
    value = ds.get("NumberOfFrames")
    return int(value) if value not in (None, "") else 1


def _first_item(ds: Any, keyword: str) -> Any:
    seq = ds.get(keyword) if ds is not None else None
    return seq[0] if seq else None


def _numbers(value: Any) -> list[float] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str | bytes | int | float) or not hasattr(value, "__iter__"):
        value = [value]
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not numeric") from None


def _lookup(items: list[Any], macro: str, keyword: str) -> list[float] | None:
    """``keyword`` from the first of ``items`` (frame item, shared item, dataset) that holds it.

    The frame and shared items hold it inside the macro sequence ``macro``; the dataset itself at its top level.
    """
    for k, item in enumerate(items):
        if item is None:
            continue
        holder = item if k == len(items) - 1 else _first_item(item, macro)
        if holder is not None and keyword in holder:
            try:
                return _numbers(holder.get(keyword))
            except ValueError as exc:
                raise ValueError(f"{keyword}: {exc}") from None
    return None


def _first(values: list[float] | None) -> float | None:
    return values[0] if values else None


def frame_headers(ds: pydicom.Dataset) -> list[FrameHeader]:
    """The header of every frame of a multi-frame dataset, in frame order.

    Args:
        ds: the dataset (pixels need not be read).

    Returns:
        One :class:`FrameHeader` per frame (``NumberOfFrames`` of them).

    Raises:
        ValueError: the Per-frame Functional Groups Sequence has the wrong number of items, or a value is not
            numeric (the message says which).
    """
    n = number_of_frames(ds)
    per_frame = ds.get(_PER_FRAME)
    if per_frame is not None and len(per_frame) != n:
        raise ValueError(f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {n} frames")
    shared = _first_item(ds, _SHARED)
    out = []
    for i in range(n):
        own = per_frame[i] if per_frame is not None else None
        items = [own, shared, ds]
        # A top-level position can only place a single frame: with several, each frame needs its own.
        position_items = items if n == 1 else [own, shared, None]
        out.append(
            FrameHeader(
                frame=i + 1,
                ipp=_lookup(position_items, "PlanePositionSequence", "ImagePositionPatient"),
                iop=_lookup(items, "PlaneOrientationSequence", "ImageOrientationPatient"),
                pixel_spacing=_lookup(items, "PixelMeasuresSequence", "PixelSpacing"),
                slice_thickness=_first(_lookup(items, "PixelMeasuresSequence", "SliceThickness")),
                slope=_first(_lookup(items, "PixelValueTransformationSequence", "RescaleSlope")),
                intercept=_first(_lookup(items, "PixelValueTransformationSequence", "RescaleIntercept")),
                window_center=_first(_lookup(items, "FrameVOILUTSequence", "WindowCenter")),
                window_width=_first(_lookup(items, "FrameVOILUTSequence", "WindowWidth")),
            )
        )
    return out
