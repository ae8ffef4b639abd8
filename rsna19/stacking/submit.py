"""Kaggle submission from a finished stack directory: one method's test probabilities → ``ID,Label`` csv."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.constants import PROB_COLUMNS
from rsna19.errors import UserError
from rsna19.io.rsna_csv import read_long, split_ids, wide_to_long, write_long


def stack_test_predictions(stack_dir: str | os.PathLike[str], which: str = "blend") -> pd.DataFrame:
    """The test predictions of method ``which`` in ``stack_dir/test.parquet``.

    Returns:
        One row a slice: ``sop_uid`` and ``p_<class>`` ×6.

    Raises:
        UserError: no finished stack there, or no such method (the message lists the available ones).
    """
    path = Path(stack_dir) / "test.parquet"
    if not path.is_file():
        raise UserError(f"no stack test predictions at {path}; run `rsna19 stack` first")
    df = pd.read_parquet(path)
    methods = sorted(df["model"].unique())
    if which not in methods:
        raise UserError(f"{path}: no predictions of {which!r}; available: {', '.join(methods)}")
    return df.loc[df["model"] == which, ["sop_uid", *PROB_COLUMNS]].reset_index(drop=True)


def check_submission(long: pd.DataFrame, sample: pd.DataFrame | None = None, where: str = "submission") -> None:
    """Validate a long ``ID,Label`` table: well-formed unique IDs, finite labels in [0, 1], six rows a slice and,
    given the sample submission, exactly its IDs.

    Raises:
        UserError: naming the first problem and how many rows have it.
    """
    sop, _ = split_ids(long["ID"])
    if sop.isna().any():
        raise UserError(f"{where}: {int(sop.isna().sum())} malformed ID(s), e.g. {long['ID'][sop.isna()].iloc[0]!r}")
    if long["ID"].duplicated().any():
        raise UserError(f"{where}: {int(long['ID'].duplicated().sum())} duplicated ID(s)")
    values = pd.to_numeric(long["Label"], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(values) | (values < 0) | (values > 1)
    if bad.any():
        raise UserError(f"{where}: {int(bad.sum())} label(s) not a probability in [0, 1]")
    if (sop.value_counts() != 6).any():
        raise UserError(f"{where}: {int((sop.value_counts() != 6).sum())} slice(s) without exactly six class rows")
    if sample is not None:
        ours, theirs = pd.Index(long["ID"]), pd.Index(sample["ID"])
        missing, extra = theirs.difference(ours), ours.difference(theirs)
        if len(missing) or len(extra):
            raise UserError(
                f"{where}: {len(missing)} ID(s) of the sample submission missing and {len(extra)} not in it"
                + (f" (e.g. missing {missing[0]})" if len(missing) else f" (e.g. extra {extra[0]})")
            )


def write_stack_submission(
    stack_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    which: str = "blend",
    sample_submission: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the validated Kaggle csv of method ``which`` (rows in the sample submission's order when given).

    Args:
        stack_dir: ``<out>/<name>`` of a finished ``rsna19 stack``.
        out: csv to write (atomically).
        which: ``blend``, ``lgbm``, ``mlp``, ``convex`` or ``mean``.
        sample_submission: Kaggle ``stage_2_sample_submission.csv``; its IDs must match exactly.
    """
    wide = stack_test_predictions(stack_dir, which)
    long = wide_to_long(wide, prefix="p_")
    sample = None
    if sample_submission is not None:
        sample = read_long(sample_submission)
        check_submission(long, sample, where=f"submission for {sample_submission}")
        long = long.set_index("ID").loc[sample["ID"]].reset_index()
    else:
        check_submission(long)
    return write_long(long, out)
