"""Convert one series to the cache format: ordered, tilt-corrected, cropped int16 HU.

:func:`convert_series` works from file paths alone, so inference on new studies uses exactly the training
conversion; :func:`convert_mask` moves a mask in the DICOM frame through the identical map; :func:`write_series`
writes a converted series into the cache atomically.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.conversion.geometry import TILT_THRESHOLD_DEG, order_slices, slice_spacing, tilt_shifts
from rsna19.conversion.read import Slice, describe_error, lenient_reading, read_file_slices_unguarded
from rsna19.conversion.resample import (
    Window,
    centred_window,
    mass_centre,
    resampled_shape,
    sample_window,
    scale_factors,
)
from rsna19.core.atomic import atomic_path, ensure_writable_dir
from rsna19.core.constants import AIR_HU, CLASSES
from rsna19.io.dicom import pick_geometry, positions_along_normal, series_orientation, slice_normal, tilt_deg
from rsna19.viz.preview import write_preview

#: Bump when the conversion changes what it writes: every cached series is then out of date.
CONVERSION_VERSION = 2  # 2: one geometry rule and series orientation with predict-study (rsna19.io.dicom)


class SeriesError(ValueError):
    """A whole series cannot be converted; ``dropped`` lists the per-slice reasons that led there."""

    def __init__(self, message: str, dropped: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.dropped = dropped or []


@dataclass(frozen=True)
class ConvertParams:
    """What a conversion depends on besides its inputs (stored in meta.json; a change re-converts).

    Attributes:
        crop: output window side in pixels (square), None or 0 for the whole frame.
        spacing: in-plane pixel spacing (mm) to resample to first, None to keep the scanner's.
        correct_tilt: undo gantry tilt above 0.5°.
    """

    crop: int | None = 400
    spacing: float | None = None
    correct_tilt: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def _rows_of(paths_or_rows: Any) -> list[dict[str, Any]]:
    """Normalise paths, index rows (DataFrame) or dicts to a list of dicts with at least ``path``."""
    if isinstance(paths_or_rows, pd.DataFrame):
        if "path" not in paths_or_rows.columns:
            raise ValueError("the rows need a 'path' column")
        rows = paths_or_rows.to_dict("records")
    else:
        rows = [dict(r) if isinstance(r, Mapping) else {"path": os.fspath(r)} for r in paths_or_rows]
    for r in rows:
        r["path"] = str(r["path"])
        r["frame"] = _frame(r.get("frame"))
    # The input order must not matter (outputs are compared byte for byte between runs).
    return sorted(rows, key=lambda r: (str(r.get("sop_uid", "")), r["path"], r["frame"]))


def _frame(value: Any) -> int:
    """The ``frame`` of a row: 1-based within a multi-frame file, 0 for a whole file (absent, None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0
    return int(value)


def _text(value: Any) -> str | None:
    """A string field of an index row, None where missing (NaN in pandas)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _label(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def input_fingerprint(paths_or_rows: Any) -> str:
    """A hash of what a series' conversion reads: per file its SOP UID, size and mtime, plus its labels.

    Args:
        paths_or_rows: as for :func:`convert_series`.

    Returns:
        hex SHA-1.
    """
    h = hashlib.sha1()
    for r in _rows_of(paths_or_rows):
        try:
            st = os.stat(r["path"])
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        labels = [_label(r.get(c)) for c in CLASSES]
        extra = [_text(r.get(k)) for k in ("study_uid", "patient_id", "split")]
        entry = [_text(r.get("sop_uid")), os.path.basename(r["path"]), stamp, labels, extra]
        if r["frame"]:  # only frames add a field: fingerprints of single-frame series stay as they were
            entry.append(r["frame"])
        h.update(json.dumps(entry).encode())
    return h.hexdigest()


def _pick_geometry(slices: list[Slice], dropped: list[dict[str, str]]) -> list[Slice]:
    """The slices that agree with the series geometry (:func:`rsna19.io.dicom.pick_geometry`); the others go to
    ``dropped``.

    Raises:
        SeriesError: no geometry is shared by a strict majority of the slices.
    """
    geometries = [s.geometry() for s in slices]
    kept, off = pick_geometry(geometries)
    if not all(geometries[i].agrees(geometries[kept[0]]) for i in kept):
        shown = "; ".join(sorted({str(g) for g in geometries})[:3])
        raise SeriesError(f"mixed geometry, no majority of the slices agrees on one ({shown})", dropped)
    dropped.extend({"path": slices[i].path, "sop_uid": slices[i].sop_uid, "reason": why} for i, why in off)
    return [slices[i] for i in kept]


def _read_slices(rows: list[dict[str, Any]], dropped: list[dict[str, str]]) -> tuple[list[Slice], Any]:
    """Decode every slice the rows name (each file once); unreadable files go to ``dropped``.

    Returns:
        The slices, and ``row_of(slice)``: the input row of a slice (its labels, split, UIDs).

    Raises:
        SeriesError: no slice could be read.
    """
    slices: list[Slice] = []
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    # What to read from each file: its frames (index rows of a multi-frame file), or None for "every slice the
    # file holds" (a bare path: itself, or all frames of a multi-frame file). Each file is decoded once.
    wanted: dict[str, list[int] | None] = {}
    for r in rows:
        by_key.setdefault((r["path"], r["frame"]), r)
        if r["frame"] and wanted.get(r["path"], []) is not None:
            wanted.setdefault(r["path"], []).append(r["frame"])  # type: ignore[union-attr]
        else:
            wanted[r["path"]] = None
    with lenient_reading():
        for path, frames in wanted.items():
            try:
                slices.extend(read_file_slices_unguarded(path, frames))
            except Exception as exc:  # one bad file must not stop the series: report it and go on
                reason = describe_error(exc)
                for r in [r for (p, _f), r in by_key.items() if p == path]:
                    dropped.append({"path": path, "sop_uid": str(r.get("sop_uid", "")), "reason": reason})
    if not slices:
        reasons = sorted({d["reason"] for d in dropped})
        raise SeriesError(f"no usable slice ({len(dropped)} unreadable: {'; '.join(reasons)})", dropped)

    def row_of(s: Slice) -> dict[str, Any]:
        return by_key.get((s.path, s.frame)) or by_key.get((s.path, 0)) or {"path": s.path}

    return slices, row_of


def _order_slices(slices: list[Slice], dropped: list[dict[str, str]]) -> tuple[list[Slice], np.ndarray, np.ndarray]:
    """Order the slices along the series normal (:mod:`rsna19.io.dicom`); a slice at the position of another is
    dropped.

    Returns:
        The kept slices in order, their (Z,) positions and the (6,) series orientation.
    """
    iop = series_orientation(np.stack([s.iop for s in slices]))
    positions = positions_along_normal(np.stack([s.ipp for s in slices]), slice_normal(iop))
    keep, duplicates = order_slices(positions, [s.sop_uid for s in slices])
    for dup, kept in duplicates:
        dropped.append(
            {
                "path": slices[dup].path,
                "sop_uid": slices[dup].sop_uid,
                "reason": f"duplicate position {positions[dup]:.3f} mm (kept {slices[kept].sop_uid})",
            }
        )
    return [slices[i] for i in keep], positions[keep], iop


def _crop_centre(slices: list[Slice], shifts: np.ndarray, scale: tuple[float, float]) -> tuple[float, float] | None:
    """One crop centre per series: foreground moments per slice, moved by the slice's (Z, 2) shift (no resampling
    needed); None without foreground."""
    counts = np.zeros(len(slices))
    row_sums = np.zeros(len(slices))
    col_sums = np.zeros(len(slices))
    rows_in, cols_in = slices[0].hu.shape
    # Every other row and column is plenty for a crop centre and four times cheaper.
    row_idx, col_idx = np.arange(0, rows_in, 2), np.arange(0, cols_in, 2)
    for k, s in enumerate(slices):
        fg = (s.hu[::2, ::2] > 0).view(np.uint8)
        per_row = fg.sum(axis=1, dtype=np.int64)
        per_col = fg.sum(axis=0, dtype=np.int64)
        counts[k] = per_row.sum()
        row_sums[k] = per_row @ row_idx
        col_sums[k] = per_col @ col_idx
    return mass_centre(counts, row_sums, col_sums, shifts, scale)


def _sample(slices: list[Slice], window: Window, shifts: np.ndarray) -> np.ndarray:
    """(Z, H, W) int16: each slice moved by its (Z, 2) shift and sampled in ``window`` (air outside the slice)."""
    volume = np.empty((len(slices), window.height, window.width), dtype=np.int16)
    for k, s in enumerate(slices):
        volume[k] = sample_window(s.hu, window, (float(shifts[k, 0]), float(shifts[k, 1])), 1, AIR_HU)
        s.hu = None  # type: ignore[assignment]  # free the input as soon as it is used: memory ≤ one series
    return volume


def convert_series(
    paths_or_rows: Iterable[str | os.PathLike[str] | Mapping[str, Any]] | pd.DataFrame,
    crop: int | None = 400,
    spacing: float | None = None,
    correct_tilt: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Convert the files of one series to a cropped, ordered, tilt-corrected HU volume.

    Args:
        paths_or_rows: the series' files, as paths or as index rows (a DataFrame or dicts with ``path`` and
            optionally ``sop_uid, study_uid, patient_id, split, series_uid`` and the six label columns).
        crop: output window side (pixels), None/0 for the whole (resampled) frame.
        spacing: in-plane spacing (mm) to resample to, None to keep the scanner's.
        correct_tilt: undo gantry tilt above 0.5° (per-slice shifts that unshear the stack).

    Returns:
        ``volume``: (Z, H, W) int16 HU, z = 0 the smallest position along the normal. ``meta``: the meta.json
        dict (contract fields plus ``labels``, ``dropped`` slices with reasons, and what :func:`convert_mask`
        needs to repeat the map).

    Raises:
        SeriesError: no slice of the series could be used, or the files hold several series.
    """
    params = ConvertParams(crop=int(crop) if crop else None, spacing=spacing, correct_tilt=bool(correct_tilt))
    rows = _rows_of(paths_or_rows)
    if not rows:
        raise SeriesError("no files")
    dropped: list[dict[str, str]] = []
    slices, row_of = _read_slices(rows, dropped)
    series_uids = sorted({_text(row_of(s).get("series_uid")) or s.series_uid for s in slices})
    if len(series_uids) > 1:
        raise SeriesError(f"the files hold {len(series_uids)} series: {', '.join(series_uids[:5])}", dropped)
    slices, positions, iop = _order_slices(_pick_geometry(slices, dropped), dropped)
    ipps = np.stack([s.ipp for s in slices])
    pixel_spacing = slices[0].pixel_spacing
    rows_in, cols_in = slices[0].hu.shape

    tilt = tilt_deg(iop)
    corrected = params.correct_tilt and abs(tilt) > TILT_THRESHOLD_DEG
    shifts = tilt_shifts(ipps, iop, pixel_spacing) if corrected else np.zeros((len(slices), 2))
    scale = scale_factors(pixel_spacing, params.spacing)
    frame = resampled_shape((rows_in, cols_in), pixel_spacing, params.spacing)

    centre = _crop_centre(slices, shifts, scale)
    if centre is None:
        centre = ((frame[0] - 1) / 2.0, (frame[1] - 1) / 2.0)
    window = centred_window(centre, frame, params.crop, scale)

    volume = _sample(slices, window, shifts)

    first = row_of(slices[0])
    out_spacing = (params.spacing, params.spacing) if params.spacing else pixel_spacing
    labels = {c: [_label(row_of(s).get(c)) for s in slices] for c in CLASSES}
    meta: dict[str, Any] = {
        "series_uid": series_uids[0],
        "study_uid": _text(first.get("study_uid")) or slices[0].study_uid,
        "patient_id": _text(first.get("patient_id")) or slices[0].patient_id,
        "split": _text(first.get("split")),
        "sop_uids": [s.sop_uid for s in slices],
        "positions": [round(float(p), 6) for p in positions],
        "spacing": [
            round(slice_spacing(positions, slices[0].slice_thickness), 6),
            float(out_spacing[0]),
            float(out_spacing[1]),
        ],
        "tilt_deg": round(tilt, 6),
        "tilt_corrected": bool(corrected),
        "crop_box": window.box,
        "original_shape": [len(slices), int(rows_in), int(cols_in)],
        "shape": list(volume.shape),
        "conversion_version": CONVERSION_VERSION,
        "params": params.to_dict(),
        "input_fingerprint": input_fingerprint(rows),
        "pixel_spacing_in": [float(pixel_spacing[0]), float(pixel_spacing[1])],
        "scale": [float(scale[0]), float(scale[1])],
        "slice_shifts_px": [[round(float(a), 6), round(float(b), 6)] for a, b in shifts],
        "labels": labels,
        "dropped": sorted(dropped, key=lambda d: (d["path"], d["reason"])),
    }
    return volume, meta


def convert_mask(mask: np.ndarray, meta: Mapping[str, Any], sop_uids: Sequence[str] | None = None) -> np.ndarray:
    """Move a mask through exactly the map of a converted series (tilt shift, resample, crop; nearest).

    Args:
        mask: (Z, rows, cols) uint8 in the DICOM pixel frame, slices in spatial order.
        meta: the series' meta (from :func:`convert_series` or meta.json).
        sop_uids: (Z,) the mask slices' SOP UIDs; where given, the slices of ``meta["sop_uids"]`` are picked from
            them (so dropped or duplicated slices are skipped). Without it ``mask`` must match the volume's Z.

    Returns:
        (Z', H, W) mask aligned with ``volume.npy``.

    Raises:
        ValueError: the mask does not fit the series.
    """
    mask = np.asarray(mask)
    want = list(meta["sop_uids"])
    if sop_uids is not None:
        where = {str(u): i for i, u in enumerate(sop_uids)}
        missing = [u for u in want if u not in where]
        if missing:
            raise ValueError(f"mask has no slice for {len(missing)} SOP UIDs, e.g. {missing[0]}")
        mask = mask[[where[u] for u in want]]
    if mask.ndim != 3 or mask.shape[0] != len(want) or list(mask.shape[1:]) != list(meta["original_shape"][1:]):
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match the series ({len(want)}, "
            f"{meta['original_shape'][1]}, {meta['original_shape'][2]})"
        )
    y0, x0, y1, x1 = meta["crop_box"]
    window = Window(y0, x0, y1 - y0, x1 - x0, tuple(meta["scale"]))  # type: ignore[arg-type]
    out = np.empty((len(want), window.height, window.width), dtype=mask.dtype)
    for k, shift in enumerate(meta["slice_shifts_px"]):
        out[k] = sample_window(mask[k], window, (float(shift[0]), float(shift[1])), 0, 0)
    return out


def meta_json(meta: Mapping[str, Any]) -> str:
    """The exact text of meta.json (stable key order and formatting, so re-runs are byte-identical)."""
    return json.dumps(meta, indent=1, sort_keys=True, allow_nan=False) + "\n"


def write_series(
    volume: np.ndarray, meta: Mapping[str, Any], cache: str | os.PathLike[str], preview: bool = True
) -> Path:
    """Write ``volume.npy``, ``meta.json`` and ``preview.png`` of a series under ``cache`` atomically.

    Everything goes to a temporary folder first (:func:`rsna19.core.atomic.atomic_path`), which is renamed to
    ``cache/<series>/`` at the end: a series directory exists only once complete.

    Returns:
        the series directory.
    """
    series = str(meta["series_uid"])
    if not series or os.sep in series or series.startswith("."):
        raise SeriesError(f"series UID {series!r} cannot name a directory")
    final = ensure_writable_dir(cache) / series
    with atomic_path(final) as tmp:
        tmp.mkdir()
        np.save(tmp / "volume.npy", np.ascontiguousarray(volume, dtype=np.int16))
        if preview:
            labels = {c: np.asarray([np.nan if v is None else v for v in meta["labels"][c]]) for c in CLASSES}
            write_preview(volume, labels, tmp / "preview.png")
        (tmp / "meta.json").write_text(meta_json(meta), encoding="utf-8")
    return final


def read_meta(series_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """meta.json of a complete series directory, or None where it is missing or unreadable."""
    try:
        return json.loads((Path(series_dir) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
