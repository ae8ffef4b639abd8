"""The input facts of one series, the same for the training series (bundle export) and for each new study.

Header facts come from the first source file of the series (``Manufacturer``, ``ConvolutionKernel``,
``SliceThickness``, ``PixelSpacing``); HU facts from the series as the models see it (the converted volume), inside
the head: the slices that show a head (:func:`rsna19.inference.assess.head_slices`) and, on them, the soft-tissue
pixels (−20…100 HU, brain, blood, CSF) for the median and the bone fraction of the head (≥ 300 HU among the pixels
above −200 HU).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from rsna19.inference.assess import BONE_HU, SOFT_HU, head_slices

#: Fact name → kind: ``category`` (compared by share of each value) or ``number`` (by share in reference bins).
FACTS: dict[str, str] = {
    "manufacturer": "category",
    "kernel": "category",
    "slice_thickness_mm": "number",
    "pixel_spacing_mm": "number",
    "hu_brain_median": "number",
    "hu_bone_fraction": "number",
}


def header_facts(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Manufacturer, kernel, slice thickness and pixel spacing from one file's header (None where absent)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - an unreadable header gives unknown facts, never a failure
        return {"manufacturer": None, "kernel": None, "slice_thickness_mm": None, "pixel_spacing_mm": None}

    def text(keyword: str) -> str | None:
        v = ds.get(keyword)
        if v is None or v == "":
            return None
        return "\\".join(str(x) for x in v) if isinstance(v, list | tuple | pydicom.multival.MultiValue) else str(v)

    def number(v: Any) -> float | None:
        try:
            return round(float(v[0] if isinstance(v, list | tuple | pydicom.multival.MultiValue) else v), 4)
        except (TypeError, ValueError, IndexError):
            return None

    spacing = ds.get("PixelSpacing")
    thickness = ds.get("SliceThickness")
    for key in ("SharedFunctionalGroupsSequence",):  # Enhanced CT: pixel measures in the functional groups
        for g in ds.get(key) or []:
            for pm in g.get("PixelMeasuresSequence") or []:
                spacing = spacing or pm.get("PixelSpacing")
                thickness = thickness or pm.get("SliceThickness")
    return {
        "manufacturer": text("Manufacturer"),
        "kernel": text("ConvolutionKernel"),
        "slice_thickness_mm": number(thickness),
        "pixel_spacing_mm": number(spacing),
    }


def hu_facts(volume_hu: np.ndarray) -> dict[str, float | None]:
    """HU statistics inside the head of a (Z, H, W) volume (None without a head slice)."""
    v = np.asarray(volume_hu)
    head = head_slices(v) if v.size else np.zeros(0, dtype=bool)
    if not head.any():
        return {"hu_brain_median": None, "hu_bone_fraction": None}
    h = v[head].astype(np.float32)
    soft = h[(h >= SOFT_HU[0]) & (h <= SOFT_HU[1])]
    tissue = h > -200
    return {
        "hu_brain_median": round(float(np.median(soft)), 3) if soft.size else None,
        "hu_bone_fraction": round(float((h >= BONE_HU).sum() / max(int(tissue.sum()), 1)), 5),
    }


def series_facts(path: str | os.PathLike[str], volume_hu: np.ndarray) -> dict[str, Any]:
    """Every fact of :data:`FACTS` for one series: its first source file and its converted volume."""
    return {**header_facts(path), **hu_facts(volume_hu)}


def study_input_facts(study: Any, series: Any) -> dict[str, Any]:
    """The facts of a study's report series (``series``: ``series_uid``, ``volume``), its first source file's header.

    Args:
        study: the study's input (``used`` series with ``series_uid`` and ``slice_refs()``).
        series: the series the report shows (:class:`rsna19.study.batch.SeriesPrediction`).
    """
    refs = [r for s in study.used if s.series_uid == series.series_uid for r in s.slice_refs()]
    path = refs[0]["path"] if refs else None
    header = header_facts(path) if path is not None else dict.fromkeys(("manufacturer", "kernel"))
    return {**header, **hu_facts(series.volume)}
