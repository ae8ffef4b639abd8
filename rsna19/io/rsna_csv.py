"""The Kaggle ``ID,Label`` csv format, long ↔ wide.

Long: one row per (slice, class), ``ID = <sop_uid>_<class>`` where the SOP UID is itself ``ID_<hex>``, e.g.
``ID_12cadc6af_epidural``; six rows a slice in :data:`rsna19.core.constants.CLASSES` order. This is the format of
``stage_2_train.csv``, the sample submission, ``test_labels.csv`` and a submission.

Wide: one row per slice, ``sop_uid`` + one column per class (named by a prefix + class name, e.g. ``epidural``
for labels or ``p_epidural`` for probabilities).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.core.atomic import atomic_path
from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError

log = logging.getLogger(__name__)


def read_long(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read an ``ID,Label`` csv as strings (no parsing of labels yet, so bad rows can be named).

    Args:
        path: the csv.

    Returns:
        DataFrame with str columns ``ID`` and ``Label`` (missing cells as NaN), in file order.

    Raises:
        UserError: the file is missing, unreadable or does not have the ``ID`` and ``Label`` columns.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable csv: {' '.join(str(exc).split())}") from None
    if list(df.columns[:2]) != ["ID", "Label"] or len(df.columns) != 2:
        raise UserError(f"{path}: expected the columns ID,Label, found {','.join(map(str, df.columns))}")
    return df


def split_ids(ids: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Split ``ID_<hex>_<class>`` into the SOP UID and the class name.

    Args:
        ids: (N,) str IDs (NaN allowed).

    Returns:
        ``(sop_uid, cls)``, both (N,) object Series; an ID that is not ``<sop>_<known class>`` gives NaN in both.
    """
    text = ids.fillna("").astype(str)
    parts = text.str.rsplit("_", n=1, expand=True)
    if parts.shape[1] < 2:  # no ID had an underscore
        parts[1] = None
    sop, cls = parts[0], parts[1]
    ok = cls.isin(CLASSES) & sop.str.startswith("ID_") & (sop.str.len() > 3)
    return sop.where(ok), cls.where(ok)


def long_to_wide(df: pd.DataFrame, prefix: str = "", keep: str = "first") -> pd.DataFrame:
    """Pivot a long ``ID,Label`` table into one row per SOP.

    Duplicate IDs are tolerated (the real ``stage_1_train.csv`` has some): ``keep="first"`` keeps the first
    occurrence, ``keep="max"`` the largest value. Rows with malformed IDs must have been rejected before.

    Args:
        df: long table with ``ID`` and numeric ``Label``.
        prefix: column name prefix (``""`` for labels, ``"p_"`` for probabilities).
        keep: ``"first"`` or ``"max"``.

    Returns:
        DataFrame with ``sop_uid`` and ``<prefix><class>`` for every class (float, NaN where a class row is
        missing), sorted by ``sop_uid``.
    """
    sop, cls = split_ids(df["ID"])
    long = pd.DataFrame({"sop_uid": sop, "cls": cls, "value": pd.to_numeric(df["Label"], errors="coerce")})
    long = long.dropna(subset=["sop_uid"])
    if keep == "first":
        long = long.drop_duplicates(subset=["sop_uid", "cls"], keep="first")
        wide = long.pivot(index="sop_uid", columns="cls", values="value")
    elif keep == "max":
        wide = long.pivot_table(index="sop_uid", columns="cls", values="value", aggfunc="max", dropna=False)
    else:
        raise ValueError(f"keep must be 'first' or 'max', got {keep!r}")
    wide = wide.reindex(columns=list(CLASSES)).astype(float)
    wide.columns = [f"{prefix}{c}" for c in CLASSES]
    return wide.reset_index().rename_axis(columns=None).sort_values("sop_uid", ignore_index=True)


def wide_to_long(df: pd.DataFrame, prefix: str = "") -> pd.DataFrame:
    """Melt a wide table (``sop_uid`` + ``<prefix><class>``) into ``ID,Label`` rows, six a slice in class order.

    Args:
        df: (N rows) wide table.
        prefix: prefix of the value columns.

    Returns:
        (6N rows) DataFrame with ``ID`` and float ``Label``, slices in the order of ``df``.
    """
    cols = [f"{prefix}{c}" for c in CLASSES]
    missing = [c for c in ["sop_uid", *cols] if c not in df.columns]
    if missing:
        raise UserError(f"wide table lacks the columns {', '.join(missing)}")
    sop = df["sop_uid"].astype(str).to_numpy()
    values = df[cols].to_numpy(dtype=np.float64)  # (N, 6)
    ids = np.repeat(sop, len(CLASSES)).astype(object) + "_" + np.tile(np.array(CLASSES, dtype=object), len(sop))
    return pd.DataFrame({"ID": ids, "Label": values.reshape(-1)})


def write_long(df: pd.DataFrame, path: str | os.PathLike[str], float_format: str | None = None) -> Path:
    """Write an ``ID,Label`` table atomically.

    Args:
        df: long table.
        path: output csv.
        float_format: e.g. ``"%.8g"``; None writes full precision.
    """
    with atomic_path(path) as tmp:
        df[["ID", "Label"]].to_csv(tmp, index=False, float_format=float_format)
    return Path(path)


def read_labels(path: str | os.PathLike[str], keep: str = "first") -> pd.DataFrame:
    """Read a label csv (``stage_2_train.csv`` format) into one row per slice.

    Args:
        path: the csv.
        keep: how duplicate rows are resolved, see :func:`long_to_wide`.

    Returns:
        DataFrame with ``sop_uid`` and the six class columns (float 0/1; NaN where a class row is missing).

    Raises:
        UserError: malformed ID or non-numeric label, naming the first bad line.
    """
    df = read_long(path)
    sop, _ = split_ids(df["ID"])
    bad = sop.isna()
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise UserError(f"{path}: line {i + 2}: malformed ID {df['ID'].iloc[i]!r} (expected ID_<hex>_<class>)")
    labels = pd.to_numeric(df["Label"], errors="coerce")
    bad = ~np.isfinite(labels.to_numpy(dtype=np.float64))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{path}: line {i + 2}: label {df['Label'].iloc[i]!r} of {df['ID'].iloc[i]} is not a number")
    n_dup = int(df["ID"].duplicated().sum())
    if n_dup:
        log.info("%s: %d duplicate label rows, keeping the %s", path, n_dup, keep)
    wide = long_to_wide(df.assign(Label=labels), keep=keep)
    n_incomplete = int(wide[list(CLASSES)].isna().any(axis=1).sum())
    if n_incomplete:
        log.warning("%s: %d slices lack some of the six class rows (left NaN)", path, n_incomplete)
    return wide
