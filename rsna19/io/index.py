"""Build ``index.parquet``: one row a usable CT slice, from the DICOM headers under some folders.

Headers are read by :func:`rsna19.io.dicom_header.read_slice_headers` in a process pool, chunks of files per task;
a multi-frame (Enhanced CT) file gives one row per frame (``frame`` 1…N, ``sop_uid`` ``<SOPInstanceUID>.f<N>``).
Every file that cannot be used goes to ``index_errors.csv`` next to the parquet with a one-line reason; the
run never stops on a bad file. Columns are described in ``docs/contracts.md`` ("index.parquet").

Rules:
    * split: ``train`` if the file lies under a folder named like ``stage_*_train*`` or its SOP has labels,
      ``test`` otherwise.
    * geometry (:mod:`rsna19.io.dicom`, shared with the converter and predict-study): ``position = IPP · n`` with
      ``n = r × c`` of the series orientation (the per-component median of its slices' ImageOrientationPatient);
      ``tilt_deg = degrees(atan2(−c_z, c_y))`` of the slice's own column cosines (gantry tilt about the x axis).
    * order: ``slice_idx`` / ``n_slices`` within a ``series_uid`` by ``position``, ties by ``sop_uid``.
    * labels: duplicate label rows keep the first occurrence; labelled SOPs without a file are counted in the
      log and ignored.
    * a second file with an already indexed SOPInstanceUID is reported as a duplicate (the first by path wins),
      because every later stage keys on ``sop_uid``.
    * ``transfer_syntax`` is recorded as read; a syntax without an installed decoder is reported when the file is
      converted (``rsna19 doctor`` lists such syntaxes in an index).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from rsna19.core.atomic import ensure_writable_dir, write_csv, write_parquet
from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.io.dicom import tilt_deg
from rsna19.io.dicom_header import HEADER_COLUMNS, read_slice_headers
from rsna19.io.rsna_csv import read_labels

log = logging.getLogger(__name__)

#: Columns of ``index.parquet`` in order.
INDEX_COLUMNS: tuple[str, ...] = (
    *HEADER_COLUMNS[:5],
    "split",
    *HEADER_COLUMNS[5:],
    "tilt_deg",
    "position",
    "slice_idx",
    "n_slices",
    *CLASSES,
)
ERROR_COLUMNS: tuple[str, ...] = ("path", "reason")
#: Folder names that mark training data (``stage_1_train_images``, ``stage_2_train`` …).
TRAIN_FOLDER_PATTERN = "stage_*_train*"
_INT_COLUMNS = ("instance_number", "rows", "cols", "bits_stored", "bits_allocated", "pixel_representation", "frame")
_STR_COLUMNS = ("path", "sop_uid", "patient_id", "study_uid", "series_uid", "split", "transfer_syntax")
#: Files per task: large enough that pickling and scheduling are noise, small enough for a smooth progress bar.
_MAX_CHUNK = 256


def errors_path(out: str | os.PathLike[str]) -> Path:
    """``index_errors.csv`` next to the index parquet ``out``."""
    return Path(out).with_name("index_errors.csv")


def list_files(dirs: Iterable[str | os.PathLike[str]], exclude: Iterable[str | os.PathLike[str]] = ()) -> list[str]:
    """Every regular file under ``dirs`` (recursively; a file argument is taken as is), absolute and sorted.

    Args:
        dirs: folders or files.
        exclude: files to leave out, with their atomic-write temporaries (our own outputs, when ``--out``
            points inside a scanned folder).

    Raises:
        UserError: a path does not exist.
    """
    skip = {os.path.abspath(p) for p in exclude}
    tmp_prefixes = tuple(f".{os.path.basename(p)}.tmp-" for p in skip)
    found: set[str] = set()

    def walk(folder: str) -> None:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.is_dir():
                    walk(entry.path)
                elif entry.is_file() and entry.path not in skip and not entry.name.startswith(tmp_prefixes):
                    found.add(entry.path)

    for d in dirs:
        d = os.path.abspath(d)
        if os.path.isfile(d):
            found.add(d)
        elif os.path.isdir(d):
            walk(d)
        else:
            raise UserError(f"{d}: no such folder")
    return sorted(found)


def read_headers(paths: Sequence[str]) -> tuple[dict[str, list[Any]], list[tuple[str, str]]]:
    """Read a chunk of files (one pool task).

    Args:
        paths: files to read.

    Returns:
        ``(columns, errors)``: the good rows column-wise (``{column: [values]}`` over :data:`HEADER_COLUMNS`,
        cheaper to pickle than one dict a row) and ``(path, reason)`` for the others.
    """
    columns: dict[str, list[Any]] = {c: [] for c in HEADER_COLUMNS}
    errors: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in paths:
            rows = read_slice_headers(path)  # one row a slice: a multi-frame file gives one per frame
            if isinstance(rows, str):
                errors.append((path, rows))
                continue
            for row in rows:
                for c in HEADER_COLUMNS:
                    columns[c].append(row[c])
    return columns, errors


def _chunks(items: Sequence[str], workers: int) -> list[Sequence[str]]:
    # About 4 chunks a worker balances the load; the cap keeps the progress bar moving on big runs.
    size = max(1, min(_MAX_CHUNK, -(-len(items) // (4 * workers))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def scan(paths: Sequence[str], workers: int = 1, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the headers of ``paths``, in a process pool when ``workers > 1``.

    Returns:
        ``(rows, errors)``: a DataFrame with :data:`HEADER_COLUMNS` and one with ``path, reason``.
    """
    columns: dict[str, list[Any]] = {c: [] for c in HEADER_COLUMNS}
    errors: list[tuple[str, str]] = []
    chunks = _chunks(paths, workers)
    bar = tqdm(total=len(paths), unit="file", desc="index", disable=not progress, smoothing=0.1)

    def collect(result: tuple[dict[str, list[Any]], list[tuple[str, str]]], n: int) -> None:
        for c in HEADER_COLUMNS:
            columns[c].extend(result[0][c])
        errors.extend(result[1])
        bar.update(n)

    try:
        if workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                collect(read_headers(chunk), len(chunk))
        else:
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
                futures = {pool.submit(read_headers, chunk): len(chunk) for chunk in chunks}
                for fut in as_completed(futures):
                    collect(fut.result(), futures[fut])
    finally:
        bar.close()
    return pd.DataFrame(columns), pd.DataFrame(errors, columns=list(ERROR_COLUMNS))


def add_geometry(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``tilt_deg``, ``position``, ``slice_idx`` and ``n_slices`` (see the module docstring).

    Args:
        df: rows with ``ipp_*``, ``iop_*``, ``series_uid`` and ``sop_uid``.

    Returns:
        A new frame sorted by ``series_uid, slice_idx`` with a fresh index.
    """
    columns = [f"iop_{i}" for i in range(6)]
    iop = df[columns].to_numpy(dtype=np.float64).reshape(-1, 6)
    ipp = df[["ipp_x", "ipp_y", "ipp_z"]].to_numpy(dtype=np.float64).reshape(-1, 3)
    # The series orientation of rsna19.io.dicom.series_orientation (per-component median), one per row.
    series_iop = df.groupby("series_uid", sort=False)[columns].transform("median").to_numpy(dtype=np.float64)
    normal = np.cross(series_iop[:, :3], series_iop[:, 3:]).reshape(-1, 3)  # (N, 3)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)  # degenerate IOP was rejected by read_header
    df["tilt_deg"] = tilt_deg(iop)
    df["position"] = (ipp * normal).sum(axis=1)
    df = df.sort_values(["series_uid", "position", "sop_uid"], ignore_index=True, kind="stable")
    df["slice_idx"] = df.groupby("series_uid", sort=False).cumcount().astype(np.int64)
    df["n_slices"] = df.groupby("series_uid", sort=False)["sop_uid"].transform("size").astype(np.int64)
    return df


def _is_train_path(paths: Sequence[str]) -> np.ndarray:
    """(N,) bool: the path has a parent folder named like :data:`TRAIN_FOLDER_PATTERN`."""
    parents = [os.path.dirname(p) for p in paths]
    hits = {d: any(fnmatch.fnmatchcase(part, TRAIN_FOLDER_PATTERN) for part in Path(d).parts) for d in set(parents)}
    return np.array([hits[d] for d in parents], dtype=bool)


def _drop_duplicate_sops(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    df = df.sort_values("path", ignore_index=True, kind="stable")  # stable: a file's frames keep their order
    dup = df["sop_uid"].duplicated(keep="first")
    if not dup.any():
        return df, pd.DataFrame(columns=list(ERROR_COLUMNS))
    first = df.loc[~dup].set_index("sop_uid")["path"]
    bad = df.loc[dup]
    reasons = [f"duplicate SOPInstanceUID {s} (also in {first[s]})" for s in bad["sop_uid"]]
    return df.loc[~dup].reset_index(drop=True), pd.DataFrame({"path": bad["path"].to_numpy(), "reason": reasons})


def empty_index() -> pd.DataFrame:
    """An index with no rows and the right columns and dtypes."""
    data: dict[str, Any] = {}
    for c in INDEX_COLUMNS:
        if c in _STR_COLUMNS:
            data[c] = pd.Series([], dtype=str)
        elif c in (*_INT_COLUMNS, "slice_idx", "n_slices"):
            data[c] = pd.Series([], dtype=np.int64)
        else:
            data[c] = pd.Series([], dtype=np.float64)
    return pd.DataFrame(data)


def build_index(
    dirs: Sequence[str | os.PathLike[str]],
    labels_csv: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] = "index.parquet",
    workers: int | None = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Index the DICOM files under ``dirs`` and write ``out`` and ``index_errors.csv`` next to it.

    Args:
        dirs: folders (searched recursively) or single files.
        labels_csv: ``ID,Label`` label csv (``stage_2_train.csv``); None for no labels.
        out: output parquet path.
        workers: processes reading headers; None for ``os.cpu_count()``; 1 reads in this process.
        progress: show a tqdm progress bar.
        overwrite: if False and ``out`` exists, it is read and returned instead (restartable stages).

    Returns:
        The index: one row a usable slice, columns :data:`INDEX_COLUMNS`, sorted by ``series_uid, slice_idx``.

    Raises:
        UserError: a folder does not exist, no file was found, or the label csv is malformed.
    """
    out = Path(out)
    err_path = errors_path(out)
    if not overwrite and out.is_file():
        log.info("%s exists, not rebuilt (overwrite to rebuild)", out)
        return pd.read_parquet(out)
    workers = (os.cpu_count() or 1) if workers is None else max(1, int(workers))
    ensure_writable_dir(out.parent)  # fail now, not after reading 870k headers
    if not dirs:
        raise UserError("no folder to index")
    labels = read_labels(labels_csv) if labels_csv is not None else None

    paths = list_files(dirs, exclude=(out, err_path))
    if not paths:
        raise UserError(f"no files under {', '.join(map(str, dirs))}")
    log.info("indexing %d files with %d worker(s)", len(paths), workers)
    rows, errors = scan(paths, workers=workers, progress=progress)
    rows, dup_errors = _drop_duplicate_sops(rows)
    errors = pd.concat([errors, dup_errors], ignore_index=True) if len(dup_errors) else errors

    if len(rows):
        df = add_geometry(rows)
        df["split"] = np.where(_is_train_path(df["path"].tolist()), "train", "test")
        for c in CLASSES:
            df[c] = np.nan
        if labels is not None:
            labelled = df["sop_uid"].isin(labels["sop_uid"]).to_numpy()
            df.loc[labelled, "split"] = "train"
            values = labels.set_index("sop_uid").reindex(df["sop_uid"])[list(CLASSES)].to_numpy(dtype=np.float64)
            df[list(CLASSES)] = values
            n_orphan = int((~labels["sop_uid"].isin(df["sop_uid"])).sum())
            if n_orphan:
                log.info("%d labelled slices have no (usable) file; ignored", n_orphan)
            n_unlabelled = int(((df["split"] == "train") & ~labelled).sum())
            if n_unlabelled:
                log.warning("%d train slices have no labels", n_unlabelled)
        for c in _INT_COLUMNS:
            df[c] = df[c].astype(np.int64)
        df = df[list(INDEX_COLUMNS)]
    else:
        df = empty_index()
        log.warning("no usable slice among %d files", len(paths))

    errors = errors.sort_values("path", ignore_index=True)
    write_parquet(df, out)
    write_csv(errors, err_path)
    log.info(
        "%d slices in %d series (%d train, %d test) -> %s; %d unusable files -> %s",
        len(df),
        df["series_uid"].nunique(),
        int((df["split"] == "train").sum()),
        int((df["split"] == "test").sum()),
        out,
        len(errors),
        err_path,
    )
    return df
