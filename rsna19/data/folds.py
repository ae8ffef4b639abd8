"""Patient-grouped, label-stratified folds (docs/architecture.md, "Folds"; docs/contracts.md: ``folds.csv``).

Folds are made once and reused by every base model and by the second level, so that no patient's slices are
ever both trained on and predicted out-of-fold. Stratification is on study-level labels: each study gets one
class — 0 if it has no bleed, else 1 + the index of its rarest positive subtype — and
:class:`~sklearn.model_selection.StratifiedGroupKFold` balances those classes over folds, grouped by patient.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from rsna19.core.atomic import write_csv
from rsna19.core.constants import CLASSES, SUBTYPES
from rsna19.core.errors import UserError

log = logging.getLogger(__name__)


def study_strata(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per study: ``study_uid, patient_id, stratum``.

    Args:
        frame: slice rows (``index.parquet`` or ``cache_index.parquet``) with ``patient_id, study_uid`` and the
            six label columns.
    """
    labels = frame.groupby("study_uid", sort=True)[list(CLASSES)].max().fillna(0) > 0.5
    patient = frame.groupby("study_uid", sort=True)["patient_id"].first()
    # The rarest positive subtype names the stratum, so the rare classes are spread over the folds first.
    pos = labels[list(SUBTYPES)].to_numpy()
    freq = pos.sum(axis=0)
    rarity = np.where(pos, freq[None, :], np.inf)
    stratum = np.where(pos.any(axis=1), 1 + rarity.argmin(axis=1), 0)
    stratum[(stratum == 0) & labels["any"].to_numpy()] = len(SUBTYPES) + 1
    return pd.DataFrame({"study_uid": labels.index, "patient_id": patient.to_numpy(), "stratum": stratum})


def make_folds(frame: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Assign every training patient a fold.

    Args:
        frame: slice rows with ``patient_id, study_uid``, the six labels and optionally ``split`` (only
            ``split == "train"`` rows are used).
        n_folds: number of folds (>= 2).
        seed: shuffling seed; the same seed gives the same folds.

    Returns:
        ``patient_id, fold`` sorted by patient.

    Raises:
        UserError: missing columns, or fewer patients than folds.
    """
    missing = [c for c in ("patient_id", "study_uid", *CLASSES) if c not in frame.columns]
    if missing:
        raise UserError(f"cannot make folds: missing column(s) {', '.join(missing)}")
    if "split" in frame.columns:
        frame = frame[frame["split"] == "train"]
    frame = frame.astype({"patient_id": str, "study_uid": str})
    studies = study_strata(frame)
    n_patients = studies["patient_id"].nunique()
    if n_folds < 2:
        raise UserError(f"--n-folds must be >= 2, got {n_folds}")
    if n_patients < n_folds:
        raise UserError(f"cannot make {n_folds} folds from {n_patients} training patient(s)")
    # Strata with fewer studies than folds cannot be spread: merge them into one "other bleed" stratum, and
    # give up stratification altogether if even that is too small (tiny datasets).
    strata = studies["stratum"].to_numpy().copy()
    counts = pd.Series(strata).value_counts()
    rare = counts.index[counts < n_folds]
    strata[np.isin(strata, rare) & (strata > 0)] = len(SUBTYPES) + 1
    if (pd.Series(strata).value_counts() < n_folds).all():
        strata[:] = 0
    studies["stratum"] = strata
    # Remaining rare strata only trigger sklearn warnings; the grouping still holds.
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(studies), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, val_idx) in enumerate(sgkf.split(studies, studies["stratum"], groups=studies["patient_id"])):
            fold[val_idx] = k
    studies["fold"] = fold
    # StratifiedGroupKFold keeps a group in one fold; check it, since every later stage relies on it.
    if (studies.groupby("patient_id")["fold"].nunique() > 1).any():
        raise RuntimeError("a patient was split over folds")
    out = studies.groupby("patient_id", sort=True)["fold"].first().reset_index()
    return out[["patient_id", "fold"]]


def read_slices(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read an ``index.parquet`` or a ``cache_index.parquet`` (a cache directory also works)."""
    path = Path(path)
    if path.is_dir():
        path = path / "cache_index.parquet"
    if not path.is_file():
        raise UserError(f"index not found: {path}")
    return pd.read_parquet(path)


def write_folds(
    index_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    n_folds: int = 5,
    seed: int = 0,
    force: bool = False,
) -> pd.DataFrame:
    """Make ``folds.csv`` from an index, once: an existing file is kept unless ``force``.

    Returns:
        The folds table (the existing one when it was kept).
    """
    out = Path(out)
    if out.is_file() and not force:
        log.info("folds exist, kept: %s (use --force to remake)", out)
        return read_folds(out)
    folds = make_folds(read_slices(index_path), n_folds=n_folds, seed=seed)
    write_csv(folds, out)
    sizes = folds["fold"].value_counts().sort_index().to_dict()
    log.info("wrote %s: %d patients, per fold %s", out, len(folds), sizes)
    return folds


def read_folds(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``folds.csv`` (``patient_id, fold``)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"folds file not found: {path} (run `rsna19 folds` first, or pass --folds)")
    df = pd.read_csv(path, dtype={"patient_id": str})
    if list(df.columns[:2]) != ["patient_id", "fold"]:
        raise UserError(f"{path}: expected columns patient_id, fold; got {', '.join(df.columns)}")
    return df


def split_by_fold(slices: pd.DataFrame, folds: pd.DataFrame, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training-split slices of the other folds' patients and of fold ``fold``'s patients.

    Raises:
        UserError: ``fold`` is not in the folds table, or training patients are missing from it.
    """
    n_folds = int(folds["fold"].max()) + 1
    if not 0 <= fold < n_folds:
        raise UserError(f"--fold {fold} is not in 0..{n_folds - 1}")
    train = slices[slices["split"] == "train"]
    fold_of = dict(zip(folds["patient_id"].astype(str), folds["fold"].astype(int)))
    f = train["patient_id"].astype(str).map(fold_of)
    if f.isna().any():
        lost = train.loc[f.isna(), "patient_id"].astype(str).unique()
        raise UserError(f"{len(lost)} training patient(s) missing from the folds file, e.g. {lost[0]}")
    return train[f != fold].reset_index(drop=True), train[f == fold].reset_index(drop=True)
