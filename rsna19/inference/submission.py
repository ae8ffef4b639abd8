"""Write, validate and score Kaggle submissions (``ID,Label``, six rows a test slice).

A valid submission has every expected slice × the six classes exactly once, IDs of the form
``ID_<hex>_<class>`` and probabilities that are finite numbers in [0, 1]. :func:`validate_submission` raises a
:class:`~rsna19.core.errors.UserError` naming the first bad row otherwise.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.core.metrics import score_table
from rsna19.io.rsna_csv import long_to_wide, read_labels, read_long, split_ids, wide_to_long, write_long

log = logging.getLogger(__name__)

#: Precision of the written probabilities (relative error 1e-8 is far below any score difference).
FLOAT_FORMAT = "%.8g"


def write_submission(
    df_wide: pd.DataFrame, path: str | os.PathLike[str], expected_sops: Iterable[str] | None = None
) -> Path:
    """Write a submission csv from one row a slice, after validating it.

    Args:
        df_wide: ``sop_uid`` + ``p_epidural … p_any`` (one row a slice).
        path: output csv (written atomically).
        expected_sops: the test SOPs that must all be present (and nothing else); None to skip that check.

    Returns:
        ``path``.

    Raises:
        UserError: the table is not a valid submission.
    """
    long = wide_to_long(df_wide, prefix="p_")
    validate_submission(long, expected_sops=expected_sops)
    return write_long(long, path, float_format=FLOAT_FORMAT)


def _where(source: str | None, i: int, ids: pd.Series) -> str:
    """Name row ``i`` (0-based data row) for an error message: file line (header = line 1) or table row."""
    at = f"{source}: line {i + 2}" if source else f"row {i}"
    return f"{at} ({ids.iloc[i]})" if isinstance(ids.iloc[i], str) else at


def validate_submission(
    path_or_df: str | os.PathLike[str] | pd.DataFrame, expected_sops: Iterable[str] | None = None
) -> pd.DataFrame:
    """Check a submission and return it.

    Args:
        path_or_df: a csv path, a long DataFrame (``ID, Label``) or a wide one (``sop_uid`` + ``p_<class>``).
        expected_sops: the SOPs that must all be present, and nothing else; None to skip that check.

    Returns:
        The long table (``ID`` str, ``Label`` float), in the input's order.

    Raises:
        UserError: naming the first bad row: malformed ID, label not a number, NaN/inf, outside [0, 1],
            duplicate ID, a slice without all six classes, a missing or unexpected slice.
    """
    if isinstance(path_or_df, pd.DataFrame):
        source = None
        df = path_or_df
        if "ID" not in df.columns and "sop_uid" in df.columns:
            df = wide_to_long(df, prefix="p_")
        if list(df.columns) != ["ID", "Label"]:
            raise UserError(f"submission must have the columns ID,Label, found {','.join(map(str, df.columns))}")
    else:
        source = str(path_or_df)
        df = read_long(path_or_df)
    if df.empty:
        raise UserError(f"{source or 'submission'}: no rows")
    df = df.reset_index(drop=True)
    ids = df["ID"]
    sop, cls = split_ids(ids)
    label_text = df["Label"]
    labels = pd.to_numeric(label_text, errors="coerce").to_numpy(dtype=np.float64)

    # Row-level problems: report the earliest row that has any.
    problems = [
        (sop.isna().to_numpy(), lambda i: f"malformed ID {ids.iloc[i]!r} (expected ID_<hex>_<class>)"),
        (label_text.isna().to_numpy(), lambda i: "empty label"),
        (
            np.isnan(labels) & ~_is_nan_text(label_text) & label_text.notna().to_numpy(),
            lambda i: f"label {label_text.iloc[i]!r} is not a number",
        ),
        (~np.isfinite(labels), lambda i: f"label {label_text.iloc[i]} is not finite"),
        ((labels < 0) | (labels > 1), lambda i: f"probability {labels[i]} is outside [0, 1]"),
        (ids.duplicated(keep="first").to_numpy(), lambda i: "duplicate ID (listed before)"),
    ]
    first = [(int(np.flatnonzero(mask)[0]), msg) for mask, msg in problems if mask.any()]
    if first:
        i, msg = min(first, key=lambda t: t[0])
        raise UserError(f"{_where(source, i, ids)}: {msg(i)}")

    counts = pd.Series(cls.to_numpy()).groupby(sop.to_numpy(), sort=False).nunique()
    incomplete = counts[counts < len(CLASSES)]
    if len(incomplete):
        s = incomplete.index[0]
        present = set(cls[sop == s])
        missing = [c for c in CLASSES if c not in present]
        i = int(np.flatnonzero((sop == s).to_numpy())[0])
        raise UserError(f"{_where(source, i, ids)}: slice {s} lacks the classes {', '.join(missing)}")

    if expected_sops is not None:
        expected = pd.Index(pd.unique(pd.Series(list(expected_sops), dtype=object)))
        present_sops = pd.Index(counts.index)
        missing_sops = expected.difference(present_sops, sort=False)
        if len(missing_sops):
            raise UserError(
                f"{source or 'submission'}: {len(missing_sops)} expected slices are missing, first: {missing_sops[0]}"
            )
        extra = ~sop.isin(expected).to_numpy()
        if extra.any():
            i = int(np.flatnonzero(extra)[0])
            n_extra = int(pd.Series(sop[extra]).nunique())
            raise UserError(f"{_where(source, i, ids)}: slice {sop.iloc[i]} is not expected ({n_extra} such slices)")
    return pd.DataFrame({"ID": ids.astype(str), "Label": labels})


def _is_nan_text(text: pd.Series) -> np.ndarray:
    """(N,) bool: the cell spells a NaN/inf (those are reported as 'not finite', not as 'not a number')."""
    t = text.astype(str).str.strip().str.lower()
    return t.isin(["nan", "inf", "-inf", "+inf", "infinity", "-infinity"]).to_numpy()


def score_submission(
    sub: str | os.PathLike[str] | pd.DataFrame, labels: str | os.PathLike[str] | pd.DataFrame
) -> dict[str, float]:
    """Score a submission against labels in the same ``ID,Label`` format.

    Every labelled slice must be in the submission; submission slices without labels are ignored (counted
    in ``n_ignored``).

    Args:
        sub: submission csv path or DataFrame (see :func:`validate_submission`).
        labels: label csv path or long DataFrame (``ID, Label``).

    Returns:
        :func:`rsna19.core.metrics.score_table` (``wll``, ``loss_<class>``, ``auc_<class>``) plus ``n_slices`` and
        ``n_ignored``.

    Raises:
        UserError: invalid submission or labels, or labelled slices missing from the submission.
    """
    sub_long = validate_submission(sub)
    pred = long_to_wide(sub_long, prefix="p_").set_index("sop_uid")
    if isinstance(labels, pd.DataFrame):
        truth = long_to_wide(labels).set_index("sop_uid")
        labels_name = "labels"
    else:
        truth = read_labels(labels).set_index("sop_uid")
        labels_name = str(labels)
    if truth.empty:
        raise UserError(f"{labels_name}: no labels")
    incomplete = truth[list(CLASSES)].isna().any(axis=1)
    if incomplete.any():
        raise UserError(f"{labels_name}: slice {truth.index[incomplete.to_numpy()][0]} lacks some class labels")
    missing = truth.index.difference(pred.index, sort=False)
    if len(missing):
        raise UserError(f"submission lacks {len(missing)} labelled slices, first: {missing[0]}")
    n_ignored = int((~pred.index.isin(truth.index)).sum())
    if n_ignored:
        log.info("%d submission slices have no labels and are not scored", n_ignored)
    y_pred = pred.loc[truth.index, list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    y_true = truth[list(CLASSES)].to_numpy(dtype=np.float64)
    scores = score_table(y_true, y_pred)
    scores["n_slices"] = float(len(truth))
    scores["n_ignored"] = float(n_ignored)
    return scores


def format_scores(scores: dict[str, float]) -> str:
    """A small text table of :func:`score_submission`'s output."""
    lines = [
        f"weighted log loss: {scores['wll']:.5f}  ({int(scores.get('n_slices', 0))} slices)",
        f"{'class':<18}{'log loss':>10}{'AUC':>9}",
    ]
    for c in CLASSES:
        auc = scores.get(f"auc_{c}", float("nan"))
        auc_text = "    n/a" if np.isnan(auc) else f"{auc:.4f}"
        lines.append(f"{c:<18}{scores[f'loss_{c}']:>10.5f}{auc_text:>9}")
    return "\n".join(lines)
