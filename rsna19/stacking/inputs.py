"""Load the base models' predictions for the second level and check that they join.

Every base model must predict exactly the same slices: rows are joined on ``sop_uid`` and a model with missing
or extra rows is an error naming the model and the count (a silent inner join would drop slices from the
score, an outer join would invent predictions).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.io.rsna_csv import read_labels

#: Columns that identify a slice in every prediction parquet (docs/contracts.md).
KEY_COLUMNS: tuple[str, ...] = ("sop_uid", "series_uid", "study_uid", "patient_id", "slice_idx")


def discover_models(runs: str | os.PathLike[str]) -> list[str]:
    """Names of the run directories under ``runs`` that hold at least one ``fold_*/oof.parquet``, sorted."""
    runs = Path(runs)
    if not runs.is_dir():
        raise UserError(f"runs directory not found: {runs}")
    return sorted(d.name for d in runs.iterdir() if d.is_dir() and any(d.glob("fold_*/oof.parquet")))


def read_folds(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``folds.csv`` (``patient_id, fold``), checking columns and that each patient has one fold."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"folds csv not found: {path}")
    df = pd.read_csv(path, dtype={"patient_id": str})
    missing = {"patient_id", "fold"} - set(df.columns)
    if missing:
        raise UserError(f"{path}: missing column(s) {sorted(missing)}; expected patient_id, fold")
    if df["patient_id"].duplicated().any():
        raise UserError(f"{path}: {int(df['patient_id'].duplicated().sum())} patient(s) listed more than once")
    return df[["patient_id", "fold"]].astype({"fold": int})


def _read_prediction(path: Path, split: str) -> pd.DataFrame:
    if not path.is_file():
        raise UserError(f"prediction file not found: {path}")
    df = pd.read_parquet(path)
    need = [*KEY_COLUMNS, "fold", *PROB_COLUMNS] + (list(CLASSES) if split == "oof" else [])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}")
    if df["sop_uid"].duplicated().any():
        raise UserError(f"{path}: {int(df['sop_uid'].duplicated().sum())} duplicated sop_uid row(s)")
    probs = df[list(PROB_COLUMNS)].to_numpy(np.float64)
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise UserError(f"{path}: probabilities must be finite and within [0, 1]")
    return df


def load_oof(runs: str | os.PathLike[str], model: str, folds: list[int]) -> pd.DataFrame:
    """Concatenate a model's OOF predictions over ``folds``; each slice must appear once.

    Returns:
        Frame with the key columns, ``fold``, ``p_<class>`` ×6 and the six labels.
    """
    parts = [_read_prediction(Path(runs) / model / f"fold_{k}" / "oof.parquet", "oof") for k in folds]
    df = pd.concat(parts, ignore_index=True)
    dup = df["sop_uid"].duplicated()
    if dup.any():
        raise UserError(
            f"OOF predictions of model {model!r}: {int(dup.sum())} slice(s) predicted by more than one fold"
        )
    return df


def _mean_over_folds(parts: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """One frame of the fold frames' mean probabilities, ``fold`` −1, in the first fold's row order."""
    first = next(iter(parts.values()))
    df = pd.concat(list(parts.values()), ignore_index=True)
    mean = df.groupby("sop_uid", sort=False)[list(PROB_COLUMNS)].mean()
    out = first[list(KEY_COLUMNS)].set_index("sop_uid").join(mean).reset_index()
    out["fold"] = -1
    return out


def load_test_folds(runs: str | os.PathLike[str], model: str, folds: list[int]) -> dict[int, pd.DataFrame]:
    """Each fold model's test predictions (fold → frame); every fold must predict the same slices."""
    parts: dict[int, pd.DataFrame] = {}
    ref: set[str] | None = None
    for k in folds:
        path = Path(runs) / model / f"fold_{k}" / "test.parquet"
        df = _read_prediction(path, "test")
        sops = set(df["sop_uid"])
        if ref is None:
            ref = sops
        elif sops != ref:
            raise UserError(
                f"test predictions of model {model!r}, fold {k}: {len(ref - sops)} slice(s) missing and "
                f"{len(sops - ref)} extra compared with fold {folds[0]} ({path})"
            )
        parts[k] = df
    return parts


def check_alignment(preds: dict[str, pd.DataFrame], split: str) -> None:
    """Check that every model predicts exactly the slices of the first one.

    Args:
        preds: model name → prediction frame (``sop_uid`` column), in config order.
        split: ``"oof"`` or ``"test"``, for the message.

    Raises:
        UserError: naming each offending model with its count of missing and extra rows.
    """
    names = list(preds)
    if not names:
        raise UserError(f"no base models to stack ({split})")
    ref_name = names[0]
    ref = pd.Index(preds[ref_name]["sop_uid"])
    problems = []
    for name in names[1:]:
        other = pd.Index(preds[name]["sop_uid"])
        missing = ref.difference(other)
        extra = other.difference(ref)
        if len(missing) or len(extra):
            example = (missing if len(missing) else extra)[0]
            problems.append(
                f"model {name!r} has {len(missing)} missing and {len(extra)} extra row(s) compared with "
                f"{ref_name!r} (e.g. {example})"
            )
    if problems:
        raise UserError(f"{split} predictions do not join on sop_uid: " + "; ".join(problems))


def read_test_labels(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read Kaggle-format labels (``ID,Label`` with ``ID = <sop_uid>_<class>``) into one row a slice.

    Returns:
        Frame indexed by ``sop_uid`` with the six classes as float columns.

    Raises:
        UserError: unreadable file, malformed rows, or a slice without all six labels.
    """
    wide = read_labels(path).set_index("sop_uid")
    incomplete = wide[list(CLASSES)].isna().any(axis=1)
    if incomplete.any():
        raise UserError(f"{path}: {int(incomplete.sum())} slice(s) lack a label for some class")
    return wide[list(CLASSES)]


@dataclass
class BaseInputs:
    """The base models' predictions, checked and joined.

    Attributes:
        models: base model names in config order.
        oof: model → OOF frame (every slice of the used folds once).
        test: model → test frame (mean over the folds' models).
        folds: the folds used.
        fold_of_patient: ``patient_id`` → fold, from ``folds.csv``.
        test_labels: labels of the test slices (index ``sop_uid``), or None.
        test_folds: fold → model → that fold model's test frame (the rows of ``test``, not averaged).
    """

    models: list[str]
    oof: dict[str, pd.DataFrame]
    test: dict[str, pd.DataFrame]
    folds: list[int]
    fold_of_patient: pd.Series
    test_labels: pd.DataFrame | None = None
    test_folds: dict[int, dict[str, pd.DataFrame]] = field(default_factory=dict)


def load_base_inputs(
    runs: str | os.PathLike[str],
    models: list[str],
    folds_csv: str | os.PathLike[str],
    folds: list[int] | None = None,
    test_labels: str | os.PathLike[str] | None = None,
) -> BaseInputs:
    """Load and check everything the second level reads.

    Args:
        runs: root of the base-model runs.
        models: run names; empty means every run with OOF predictions under ``runs``.
        folds_csv: ``patient_id, fold`` of the base models.
        folds: folds to use; empty or None means every fold in ``folds_csv``.
        test_labels: optional Kaggle-format labels of the test slices.

    Raises:
        UserError: a missing file, predictions that do not join, OOF rows whose fold disagrees with
            ``folds.csv`` (their level-2 score would not be out-of-fold), or fewer than two folds.
    """
    fold_df = read_folds(folds_csv)
    folds = sorted(set(folds or fold_df["fold"].unique().tolist()))
    if len(folds) < 2:
        raise UserError(f"level-2 cross-validation needs at least two folds, got {folds}")
    models = list(models) or discover_models(runs)
    if not models:
        raise UserError(f"no base-model runs with OOF predictions under {runs}")
    fold_of_patient = fold_df.set_index("patient_id")["fold"]
    oof = {m: load_oof(runs, m, folds) for m in models}
    per_fold = {m: load_test_folds(runs, m, folds) for m in models}
    test = {m: _mean_over_folds(per_fold[m]) for m in models}
    test_folds = {k: {m: per_fold[m][k] for m in models} for k in folds}
    check_alignment(oof, "OOF")
    check_alignment(test, "test")
    for m, df in oof.items():
        expected = df["patient_id"].map(fold_of_patient)
        if expected.isna().any():
            raise UserError(
                f"OOF predictions of model {m!r}: {int(expected.isna().sum())} row(s) of patients not in {folds_csv}"
            )
        wrong = int((expected.astype(int) != df["fold"].astype(int)).sum())
        if wrong:
            raise UserError(
                f"OOF predictions of model {m!r}: {wrong} row(s) carry a fold that differs from {folds_csv}; "
                "the base model was trained on other folds"
            )
    labels = None
    if test_labels:
        labels = read_test_labels(test_labels)
        missing = pd.Index(test[models[0]]["sop_uid"]).difference(labels.index)
        if len(missing):
            raise UserError(f"{test_labels}: no labels for {len(missing)} test slice(s) (e.g. {missing[0]})")
    return BaseInputs(models, oof, test, folds, fold_of_patient, labels, test_folds)
