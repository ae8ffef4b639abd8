"""The ``convert`` stage: every series of an index into the cache, in parallel, restartable.

A series is done when ``CACHE/<series>/meta.json`` exists (the directory appears by rename only) and records
the current conversion version, parameters and input fingerprint; anything else is (re)converted. Per-slice and
per-series failures go to ``convert_errors.csv``; ``cache_index.parquet`` is rebuilt at the end of every run.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from rsna19.conversion.series import (
    CONVERSION_VERSION,
    ConvertParams,
    SeriesError,
    convert_series,
    input_fingerprint,
    read_meta,
    write_series,
)
from rsna19.core.atomic import OutputError, ensure_writable_dir, pid_alive, write_csv, write_parquet
from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError

log = logging.getLogger(__name__)

#: Index columns a conversion reads (labels and study/patient/split are optional).
REQUIRED_COLUMNS = ("path", "sop_uid", "series_uid")
_ROW_COLUMNS = ("path", "frame", "sop_uid", "series_uid", "study_uid", "patient_id", "split", *CLASSES)
ERROR_COLUMNS = ["series_uid", "path", "reason"]
CACHE_INDEX_COLUMNS = ["sop_uid", "series_uid", "study_uid", "patient_id", "split", "z", "n_slices", *CLASSES]


@dataclass
class ConvertSummary:
    """What a run did.

    Attributes:
        n_series: series in the index.
        converted: series written by this run.
        skipped: series already up to date.
        failed: series that could not be converted (see convert_errors.csv).
        n_slices: slices written by this run.
        dropped_slices: slices left out of written series (unreadable, duplicates …) this run.
        peak_rss_mb: the largest peak resident memory of a process that converted series (MiB).
        seconds: wall time.
        errors: the rows of convert_errors.csv (series_uid, path, reason).
    """

    n_series: int = 0
    converted: int = 0
    skipped: int = 0
    failed: int = 0
    n_slices: int = 0
    dropped_slices: int = 0
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    errors: list[dict[str, str]] = field(default_factory=list)


def load_index(index: str | os.PathLike[str] | pd.DataFrame) -> pd.DataFrame:
    """The index as a DataFrame: a DataFrame, ``index.parquet``, or a folder holding it."""
    if isinstance(index, pd.DataFrame):
        df = index
    else:
        path = Path(index)
        if path.is_dir():
            path = path / "index.parquet"
        if not path.is_file():
            raise UserError(f"index not found: {path}")
        try:
            df = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise UserError(f"cannot read index {path}: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"index lacks column(s) {', '.join(missing)} (see docs/contracts.md)")
    return df


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _is_current(meta: dict[str, Any] | None, params: ConvertParams, fingerprint: str) -> bool:
    return (
        meta is not None
        and meta.get("conversion_version") == CONVERSION_VERSION
        and meta.get("params") == params.to_dict()
        and meta.get("input_fingerprint") == fingerprint
    )


def convert_one(series_uid: str, rows: list[dict[str, Any]], cache: str, params: ConvertParams) -> dict[str, Any]:
    """Convert and write one series (runs in a worker). Never raises: failures come back as a result.

    Returns:
        dict with ``series_uid``, ``ok``, ``n_slices``, ``dropped`` (list of dicts), ``reason`` (failures) and the
        worker's ``peak_rss_mb``.
    """
    result: dict[str, Any] = {"series_uid": series_uid, "ok": False, "n_slices": 0, "dropped": [], "reason": ""}
    try:
        volume, meta = convert_series(rows, crop=params.crop, spacing=params.spacing, correct_tilt=params.correct_tilt)
        meta["series_uid"] = series_uid  # the index names the directory
        write_series(volume, meta, cache)
        result.update(ok=True, n_slices=int(volume.shape[0]), dropped=meta["dropped"])
    except SeriesError as exc:
        result.update(reason=str(exc), dropped=exc.dropped)
    except OutputError as exc:
        # Disk full or read-only: every later series would fail the same way, so the run stops (see collect).
        result.update(reason=str(exc), fatal=True)
    except Exception as exc:  # a bug or a disk error in one series must not stop an 870k-file run
        result.update(reason=f"{type(exc).__name__}: {exc}")
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


def clean_stale_tmp(cache: Path) -> int:
    """Remove what killed runs (writer gone) left half-written in ``cache``: series directories, index and error
    files, i.e. the ``.<name>.tmp-<pid>-*`` and ``.<name>.old-<pid>`` of :func:`rsna19.core.atomic.atomic_path`."""
    removed = 0
    for p in [*cache.glob(".*.tmp-*"), *cache.glob(".*.old-*")]:
        pid_text = re.split(r"\.(?:tmp|old)-", p.name, maxsplit=1)[1].split("-", 1)[0]
        pid = int(pid_text) if pid_text.isdigit() else -1
        if pid > 0 and pid != os.getpid() and pid_alive(pid):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


def build_cache_index(cache: Path, series_uids: list[str]) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """cache_index rows and dropped-slice errors from the meta.json of every complete series listed.

    Returns:
        the cache index (columns :data:`CACHE_INDEX_COLUMNS`, sorted by series then z) and the dropped slices.
    """
    frames = []
    dropped: list[dict[str, str]] = []
    for s in series_uids:
        meta = read_meta(cache / s)
        if meta is None:
            continue
        n = len(meta["sop_uids"])
        part = {
            "sop_uid": meta["sop_uids"],
            "series_uid": [s] * n,
            "study_uid": [meta.get("study_uid")] * n,
            "patient_id": [meta.get("patient_id")] * n,
            "split": [meta.get("split")] * n,
            "z": np.arange(n, dtype=np.int64),
            "n_slices": np.full(n, n, dtype=np.int64),
        }
        for c in CLASSES:
            part[c] = np.asarray([np.nan if v is None else v for v in meta["labels"][c]], dtype=np.float64)
        frames.append(pd.DataFrame(part))
        dropped += [{"series_uid": s, "path": d["path"], "reason": d["reason"]} for d in meta.get("dropped", [])]
    if frames:
        df = pd.concat(frames, ignore_index=True)
    else:
        df = pd.DataFrame({c: pd.Series(dtype="float64" if c in CLASSES else "object") for c in CACHE_INDEX_COLUMNS})
    for c in ("sop_uid", "series_uid", "study_uid", "patient_id", "split"):
        df[c] = df[c].astype(object)
    return df[CACHE_INDEX_COLUMNS], dropped


def _executor(workers: int) -> cf.ProcessPoolExecutor:
    # fork where there is one: workers start in milliseconds with everything imported. The parent's extra threads
    # (pyarrow's pool after reading the index, tqdm's monitor) are never used by the workers, which only decode
    # DICOM and write files. Elsewhere spawn, which re-imports the package in each worker.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method))


def run_convert(
    index: str | os.PathLike[str] | pd.DataFrame,
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    crop: int | None = 400,
    spacing: float | None = None,
    correct_tilt: bool = True,
    force: bool = False,
    progress: bool = True,
) -> ConvertSummary:
    """Convert every series of ``index`` into the cache ``out``.

    Args:
        index: index DataFrame, ``index.parquet`` or its folder (columns per docs/contracts.md).
        out: the cache folder.
        workers: processes (1 converts in this process).
        crop: window side (pixels), None/0 for the whole frame.
        spacing: in-plane spacing (mm) to resample to first, None to keep the scanner's.
        correct_tilt: undo gantry tilt above 0.5°.
        force: reconvert every series, also the up-to-date ones.
        progress: show a progress bar.

    Returns:
        a :class:`ConvertSummary`; outputs are ``out/<series>/``, ``out/cache_index.parquet`` and
        ``out/convert_errors.csv``.
    """
    t0 = time.perf_counter()
    df = load_index(index)
    params = _convert_params(workers, crop, spacing, correct_tilt)
    cache = ensure_writable_dir(out)
    removed = clean_stale_tmp(cache)
    if removed:
        log.info("removed %d unfinished series folder(s) left by an interrupted run", removed)

    cols = [c for c in _ROW_COLUMNS if c in df.columns]
    df = df[cols].reset_index(drop=True)
    df["series_uid"] = df["series_uid"].astype(str)
    # Row positions per series; the rows themselves are built one series at a time (memory of the parent stays
    # about the index itself, also for 870k files).
    groups = {str(s): idx for s, idx in sorted(df.groupby("series_uid", sort=True).indices.items())}
    summary = ConvertSummary(n_series=len(groups))

    def rows_of(s: str) -> list[dict[str, Any]]:
        return df.iloc[groups[s]].to_dict("records")

    todo = []
    for s in groups:
        if not force and _is_current(read_meta(cache / s), params, input_fingerprint(rows_of(s))):
            summary.skipped += 1
        else:
            todo.append(s)
    log.info("convert: %d series, %d up to date, %d to convert", len(groups), summary.skipped, len(todo))

    failures: list[dict[str, str]] = []
    bar = tqdm(total=len(todo), desc="convert", unit="series", disable=not progress or not todo)

    def collect(res: dict[str, Any]) -> None:
        bar.update()
        _collect(summary, failures, res)

    try:
        jobs = ((s, rows_of(s), str(cache), params) for s in todo)
        _convert_all(jobs, min(workers, len(todo)), collect)
    finally:
        bar.close()

    summary.errors = _write_indexes(cache, sorted(groups), failures)
    summary.seconds = time.perf_counter() - t0
    log.info(
        "convert: %d converted, %d up to date, %d failed, %d slices written, %d slices dropped (%.1f s)",
        summary.converted,
        summary.skipped,
        summary.failed,
        summary.n_slices,
        summary.dropped_slices,
        summary.seconds,
    )
    return summary


def _write_indexes(cache: Path, series_uids: list[str], failures: list[dict[str, str]]) -> list[dict[str, str]]:
    """Write ``cache_index.parquet`` and ``convert_errors.csv`` (``failures`` and the dropped slices); returns the
    latter's rows."""
    cache_index, dropped = build_cache_index(cache, series_uids)
    write_parquet(cache_index, cache / "cache_index.parquet")
    errors = pd.DataFrame(dropped + failures, columns=ERROR_COLUMNS)
    errors = errors.sort_values(ERROR_COLUMNS, kind="stable").reset_index(drop=True)
    write_csv(errors, cache / "convert_errors.csv")
    return errors.to_dict("records")


def _convert_params(workers: int, crop: int | None, spacing: float | None, correct_tilt: bool) -> ConvertParams:
    """Check the CLI-facing options of :func:`run_convert`; the conversion parameters they give."""
    if workers < 1:
        raise UserError(f"--workers must be ≥ 1, got {workers}")
    if crop is not None and crop < 0:
        raise UserError(f"--crop must be ≥ 0, got {crop}")
    if spacing is not None and spacing <= 0:
        raise UserError(f"--spacing must be > 0, got {spacing}")
    return ConvertParams(crop=int(crop) if crop else None, spacing=spacing, correct_tilt=bool(correct_tilt))


def _collect(summary: ConvertSummary, failures: list[dict[str, str]], res: dict[str, Any]) -> None:
    """Add the result of :func:`convert_one` to ``summary``, its failed series and dropped slices to ``failures``."""
    summary.peak_rss_mb = max(summary.peak_rss_mb, float(res["peak_rss_mb"]))
    if res.get("fatal"):
        raise OutputError(res["reason"])
    if res["ok"]:
        summary.converted += 1
        summary.n_slices += res["n_slices"]
        summary.dropped_slices += len(res["dropped"])
    else:
        summary.failed += 1
        log.warning("series %s failed: %s", res["series_uid"], res["reason"])
        failures.append({"series_uid": res["series_uid"], "path": "", "reason": res["reason"]})
        failures.extend(
            {"series_uid": res["series_uid"], "path": d["path"], "reason": d["reason"]} for d in res["dropped"]
        )


def _convert_all(jobs: Iterable[tuple], workers: int, collect: Callable[[dict[str, Any]], None]) -> None:
    """Run :func:`convert_one` on each argument tuple of ``jobs``, in this process when ``workers <= 1``, and pass
    each result to ``collect``."""
    if workers <= 1:
        for job in jobs:
            collect(convert_one(*job))
        return
    with _executor(workers) as pool:
        # A bounded number of series in flight: the queue never holds the whole index.
        pending: set[cf.Future] = set()
        for job in jobs:
            if len(pending) >= 2 * workers:
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    collect(fut.result())
            pending.add(pool.submit(convert_one, *job))
        for fut in cf.as_completed(pending):
            collect(fut.result())
