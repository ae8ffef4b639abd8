"""Where a pipeline reads and writes: the RSNA data layout, the work folder, and the checks between stages.

Shared by the stage jobs (:mod:`rsna19.pipeline.stages`), the runner (:mod:`rsna19.pipeline.run`) and the job list
(:mod:`rsna19.pipeline.jobs`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from rsna19.core.config import load_config
from rsna19.core.constants import PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.engine.config import TrainConfig, config_diff, resolve_paths
from rsna19.io.rsna_csv import read_long, split_ids
from rsna19.pipeline.config import PipelineConfig
from rsna19.stacking.submit import stack_test_predictions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataLayout:
    """The files of an RSNA-layout folder (``stage_2_*`` or ``stage_1_*`` names)."""

    root: Path
    train_dir: Path
    train_csv: Path
    test_dir: Path | None
    sample_submission: Path | None
    test_labels: Path | None


def find_layout(data_dir: str | os.PathLike[str]) -> DataLayout:
    """Locate the training images and labels, the test images, the sample submission and test labels.

    Raises:
        UserError: no training folder or label csv (the message lists the names looked for).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"data folder not found: {root}")

    def first(names: list[str], kind: str) -> Path | None:
        for n in names:
            p = root / n
            if p.is_dir() if kind == "dir" else p.is_file():
                return p
        return None

    train_dir = first(["stage_2_train", "stage_2_train_images", "stage_1_train", "stage_1_train_images"], "dir")
    train_csv = first(["stage_2_train.csv", "stage_1_train.csv"], "file")
    if train_dir is None or train_csv is None:
        raise UserError(
            f"{root} is not in the RSNA layout: need stage_2_train/ (or stage_1_train/) and stage_2_train.csv "
            "(or stage_1_train.csv)"
        )
    return DataLayout(
        root=root,
        train_dir=train_dir,
        train_csv=train_csv,
        test_dir=first(["stage_2_test", "stage_2_test_images", "stage_1_test", "stage_1_test_images"], "dir"),
        sample_submission=first(["stage_2_sample_submission.csv", "stage_1_sample_submission.csv"], "file"),
        test_labels=first(["test_labels.csv", "stage_2_test_labels.csv"], "file"),
    )


@dataclass
class WorkPaths:
    """Where each stage writes under ``WORK``."""

    work: Path

    @property
    def index(self) -> Path:
        return self.work / "index.parquet"

    @property
    def cache(self) -> Path:
        return self.work / "cache"

    @property
    def folds(self) -> Path:
        return self.work / "folds.csv"

    @property
    def runs(self) -> Path:
        return self.work / "runs"

    @property
    def stack(self) -> Path:
        return self.work / "stack"

    @property
    def submission(self) -> Path:
        return self.work / "submission.csv"

    @property
    def scores(self) -> Path:
        return self.work / "scores.csv"

    @property
    def summary(self) -> Path:
        return self.work / "pipeline_summary.json"

    @property
    def resolved(self) -> Path:
        return self.work / "pipeline.yaml"


def train_overrides(cfg: PipelineConfig, model: str) -> list[str]:
    """The dotted overrides of one base model: the pipeline's, the model's own, then the device."""
    out = [*cfg.train_overrides, *cfg.model_overrides.get(model, [])]
    if cfg.device != "auto":
        out.append(f"train.device={cfg.device}")
    return out


def load_train_config(cfg: PipelineConfig, config_path: str, paths: WorkPaths) -> Any:
    """The resolved :class:`~rsna19.engine.config.TrainConfig` of one base model in this pipeline."""
    tc = load_config(TrainConfig, config_path, train_overrides(cfg, Path(config_path).stem))
    return resolve_paths(tc, str(paths.cache), str(paths.folds), str(paths.runs))


def stack_overrides(cfg: PipelineConfig, paths: WorkPaths, layout: DataLayout) -> list[str]:
    """Stack-config overrides that point it at this work folder and its base models."""
    out = [
        f"runs={paths.runs}",
        f"folds_csv={paths.folds}",
        f"out={paths.stack}",
        "models=[" + ",".join(cfg.model_names) + "]",
        "folds=[]",
    ]
    out.append(f"test_labels={layout.test_labels}" if layout.test_labels else "test_labels=null")
    return [*out, *cfg.stack_overrides]


def train_done(fold_dir: Path, epochs: int, config: dict[str, Any] | None = None) -> bool:
    """True when ``fold_dir`` holds ``best.pt`` and ``log.csv`` reached epoch ``epochs - 1`` and, given the resolved
    ``config`` (a nested dict) of the run to be, its saved ``config.yaml`` describes the same experiment.

    A finished run of another config is not done: the trainer then refuses it and names the keys that differ,
    rather than the pipeline scoring stale predictions of a model the config no longer describes.
    """
    log_csv = fold_dir / "log.csv"
    if not (fold_dir / "best.pt").is_file() or not log_csv.is_file():
        return False
    if config is not None and trained_config_diff(fold_dir, config):
        return False
    try:
        epochs_done = pd.read_csv(log_csv)["epoch"]
    except (OSError, ValueError, KeyError):
        return False
    return len(epochs_done) > 0 and int(epochs_done.max()) >= epochs - 1


def trained_config_diff(fold_dir: Path, config: dict[str, Any]) -> list[str]:
    """Keys in which ``fold_dir/config.yaml`` (the config a run was trained with) differs from ``config``; empty
    when they agree or when there is no readable ``config.yaml``."""
    try:
        saved = yaml.safe_load((fold_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return config_diff(saved, config) if isinstance(saved, dict) else []


def newer(path: Path, *than: Path) -> bool:
    """``path`` exists and is at least as new as every existing file of ``than``."""
    if not path.is_file():
        return False
    t = path.stat().st_mtime
    return all(t >= p.stat().st_mtime for p in than if p.is_file())


def check_no_leakage(cache_index: pd.DataFrame, folds: pd.DataFrame) -> list[str]:
    """The invariants every score relies on; returns warnings that do not stop a run.

    Hard stops: a patient in two folds, a training patient without a fold, and any slice, series or study that is
    both in the training and in the test rows (the same image would be scored after being trained on). A patient
    with studies on both sides is only a warning, with the count: a split fixed by someone else (the competition's
    stage 2 shares patients between train and test) is what it is, and the folds keep each patient in one fold.

    Raises:
        UserError: one of the hard stops.
    """
    if folds["patient_id"].duplicated().any():
        dup = folds.loc[folds["patient_id"].duplicated(), "patient_id"].iloc[0]
        raise UserError(f"folds: patient {dup} is listed in more than one fold")
    train = cache_index[cache_index["split"] == "train"]
    test = cache_index[cache_index["split"] != "train"]
    for col, what in (("sop_uid", "slice"), ("series_uid", "series"), ("study_uid", "study")):
        if col not in cache_index.columns:
            continue
        shared = set(train[col].astype(str)) & set(test[col].astype(str))
        if shared:
            raise UserError(
                f"leakage: {len(shared)} test {what}(s) also among the training rows (e.g. {sorted(shared)[0]}); "
                "test data must never reach training"
            )
    in_folds = set(folds["patient_id"].astype(str))
    test_only = set(test["patient_id"].astype(str)) - set(train["patient_id"].astype(str))
    if test_only & in_folds:
        # A fold holding a patient who has no training rows: the folds were made from the test split.
        raise UserError(f"leakage: test patient {sorted(test_only & in_folds)[0]} has a training fold")
    missing = set(train["patient_id"].astype(str)) - in_folds
    if missing:
        raise UserError(f"folds: {len(missing)} training patient(s) have no fold, e.g. {sorted(missing)[0]}")
    both = set(train["patient_id"].astype(str)) & set(test["patient_id"].astype(str))
    warnings = []
    if both:
        warnings.append(
            f"{len(both)} patient(s) have studies in both the training and the test set (e.g. {sorted(both)[0]}); "
            "kept as given (no shared slice, series or study)"
        )
        log.warning(warnings[-1])
    return warnings


def submission_frame(stack_dir: Path, which: str, layout: DataLayout) -> tuple[pd.DataFrame, list[str] | None, int]:
    """The stacked test predictions in the sample submission's slice order; unreadable test slices get the mean.

    Returns:
        (wide frame ``sop_uid, p_*``, the expected SOPs or None, how many slices were filled in).
    """
    wide = stack_test_predictions(stack_dir, which)
    if layout.sample_submission is None:
        return wide, None, 0
    sops, _ = split_ids(read_long(layout.sample_submission)["ID"])
    expected = list(pd.unique(sops.dropna()))
    have = wide.set_index("sop_uid")
    missing = [s for s in expected if s not in have.index]
    if missing:
        # A test file the index or the converter rejected (see index_errors.csv / convert_errors.csv) still needs
        # a row: Kaggle refuses a submission with missing IDs. The mean prediction is the least-committal value.
        fill = pd.DataFrame([have[list(PROB_COLUMNS)].mean().to_numpy()] * len(missing), columns=list(PROB_COLUMNS))
        fill.insert(0, "sop_uid", missing)
        wide = pd.concat([wide, fill], ignore_index=True)
    extra = set(wide["sop_uid"]) - set(expected)
    if extra:
        raise UserError(
            f"{len(extra)} predicted test slice(s) are not in {layout.sample_submission}, e.g. {sorted(extra)[0]}"
        )
    rank = {s: i for i, s in enumerate(expected)}
    wide = wide.assign(_r=wide["sop_uid"].map(rank)).sort_values("_r").drop(columns="_r").reset_index(drop=True)
    return wide, expected, len(missing)
