"""Kaggle submission from a finished stack directory: one method's test probabilities → ``ID,Label`` csv."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.core.constants import PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.inference.submission import write_submission
from rsna19.io.rsna_csv import read_long, split_ids


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


def write_stack_submission(
    stack_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    which: str = "blend",
    sample_submission: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the validated Kaggle csv of method ``which`` (slices in the sample submission's order when given).

    Args:
        stack_dir: ``<out>/<name>`` of a finished ``rsna19 stack``.
        out: csv to write (atomically).
        which: ``blend``, ``lgbm``, ``mlp``, ``convex`` or ``mean``.
        sample_submission: Kaggle ``stage_2_sample_submission.csv``; its slices must match exactly.

    Raises:
        UserError: no such stack output or method, or an invalid submission (see
            :func:`rsna19.inference.submission.validate_submission`).
    """
    wide = stack_test_predictions(stack_dir, which)
    expected = None
    if sample_submission is not None:
        sops, _ = split_ids(read_long(sample_submission)["ID"])
        if sops.isna().any():
            raise UserError(f"{sample_submission}: {int(sops.isna().sum())} malformed ID(s)")
        expected = pd.unique(sops)
        rank = pd.Series(np.arange(len(expected)), index=expected)
        wide = wide.assign(_rank=wide["sop_uid"].map(rank)).sort_values("_rank", na_position="last")
        wide = wide.drop(columns="_rank").reset_index(drop=True)
    return write_submission(wide, out, expected_sops=expected)
