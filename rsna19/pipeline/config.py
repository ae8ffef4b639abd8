"""Schema of a pipeline config (``configs/pipelines/*.yaml``): which base models and which stacker, and how.

Config paths in the file (``models``, ``stack``) are taken relative to the pipeline file's folder first, then to
the current directory, so ``configs/pipelines/demo.yaml`` can say ``../demo/clf2d.yaml`` and work from anywhere.

Example:
    >>> cfg = load_pipeline("demo")  # configs/pipelines/demo.yaml
    >>> [Path(m).stem for m in cfg.models]
    ['clf2d', 'seq']
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from rsna19.core.config import load_config
from rsna19.core.errors import UserError
from rsna19.pipeline.slurm import SlurmSection

#: Where the repository's configs live when the package is installed editable (``rsna19 demo`` from anywhere).
PACKAGE_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class ConvertSection:
    """Options of the convert stage (``rsna19 convert``)."""

    crop: int | None = 400
    spacing: float | None = None
    correct_tilt: bool = True
    workers: int = 1


@dataclass
class PipelineConfig:
    """One ``rsna19 run``: the base-model configs, the stack config and the settings of every stage.

    Attributes:
        name: shown in the summary; defaults to the file stem.
        models: base-model config YAMLs (``configs/...``); each trains ``n_folds`` folds.
        stack: the second-level config YAML (``configs/stack/...``).
        n_folds, folds_seed: patient-grouped folds (``rsna19 folds``).
        index_workers: processes reading DICOM headers.
        convert: the convert stage's options.
        train_overrides: dotted overrides applied to every base model (``train.epochs=2``).
        model_overrides: model config name → extra overrides for that model only.
        stack_overrides: dotted overrides of the stack config (``lgbm.num_boost_round=500``).
        stack_jobs: ``split`` (default): the second level as jobs: the level-2 features, one job per enabled
            stacker × fold (in parallel workers with ``threads_per_job`` threads when ``jobs > 1``, separate batch
            jobs on SLURM) and a final job that blends and scores; ``single``: one ``rsna19 stack`` job. Both give
            identical outputs.
        device: ``auto``, ``cpu`` or ``cuda`` for training and prediction.
        tta: test-time views of the OOF and test predictions.
        predict_batch_size: batch size of the predictions (None: the run's validation batch size).
        submit: the stack method written to ``submission.csv`` (``blend``, ``lgbm``, ``mlp``, ``convex``, ``mean``).
        jobs: model × fold trainings (and predictions) run at once, each in its own process with
            ``threads_per_job`` torch threads. On CPU, 2 jobs × 1 thread use 2 cores better than 1 job × 2 threads
            (small convolutions do not split well over threads). Keep 1 on a single GPU.
        threads_per_job: torch threads of each job process when ``jobs > 1``.
        gpus_per_job: GPUs of each model job when ``device`` is not ``cpu``: worker slot i of ``jobs`` sees GPUs
            ``i·g … i·g+g−1`` (``CUDA_VISIBLE_DEVICES``), so ``jobs: N`` on N GPUs gives every job its own GPU; with
            ``g > 1`` a training runs under ``torchrun --nproc_per_node g`` (DistributedDataParallel).
        masks: families that learn from masks (``masks=True`` in the registry) use ``DATA/masks/`` when the data has
            it (else they train as classifiers).
        slurm: where and with what ``rsna19 run --executor slurm`` submits the jobs.
    """

    name: str = "pipeline"
    models: list[str] = field(default_factory=list)
    stack: str = ""
    n_folds: int = 5
    folds_seed: int = 0
    index_workers: int = 1
    convert: ConvertSection = field(default_factory=ConvertSection)
    train_overrides: list[str] = field(default_factory=list)
    model_overrides: dict[str, list[str]] = field(default_factory=dict)
    stack_overrides: list[str] = field(default_factory=list)
    stack_jobs: str = "split"
    device: str = "auto"
    tta: list[str] = field(default_factory=lambda: ["none", "hflip", "vflip", "transpose"])
    predict_batch_size: int | None = None
    submit: str = "blend"
    jobs: int = 1
    threads_per_job: int = 1
    gpus_per_job: int = 1
    masks: bool = True
    slurm: SlurmSection = field(default_factory=SlurmSection)

    @property
    def model_names(self) -> list[str]:
        """Run names of the base models (their config file stems, as ``rsna19 train`` names them)."""
        return [Path(m).stem for m in self.models]


def find_pipeline(name_or_path: str | os.PathLike[str]) -> Path:
    """A pipeline file: an existing path, else ``configs/pipelines/<name>.yaml`` here or in the package's repo.

    Raises:
        UserError: nothing found (the message lists where it looked).
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name.removesuffix(".yaml")
    tried = [path]
    for root in (Path("configs"), PACKAGE_CONFIGS):
        cand = root / "pipelines" / f"{stem}.yaml"
        tried.append(cand)
        if cand.is_file():
            return cand
    raise UserError(f"pipeline config not found: {name_or_path} (looked at {', '.join(map(str, tried))})")


def _resolve(path: str, base: Path, what: str) -> str:
    p = Path(path)
    if p.is_absolute():
        cands = [p]
    else:
        cands = [base / p, Path.cwd() / p, PACKAGE_CONFIGS.parent / p]
    for c in cands:
        if c.is_file():
            return str(c.resolve())
    raise UserError(f"{what} {path!r} not found (looked at {', '.join(map(str, cands))})")


def load_pipeline(name_or_path: str | os.PathLike[str], overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a pipeline config and resolve its config paths to absolute ones.

    Raises:
        UserError: unknown keys, a missing config file, no models, duplicated model names or bad numbers.
    """
    path = find_pipeline(name_or_path)
    cfg = load_config(PipelineConfig, path, list(overrides))
    if not cfg.models:
        raise UserError(f"{path}: `models` lists no base-model config")
    if not cfg.stack:
        raise UserError(f"{path}: `stack` names no stack config")
    base = path.resolve().parent
    models = [_resolve(m, base, "base-model config") for m in cfg.models]
    stack = _resolve(cfg.stack, base, "stack config")
    names = [Path(m).stem for m in models]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"{path}: base-model config names must be unique (run folders), repeated: {dup}")
    unknown = sorted(set(cfg.model_overrides) - set(names))
    if unknown:
        raise UserError(f"{path}: model_overrides names unknown model(s) {unknown}; models: {names}")
    if cfg.jobs < 1 or cfg.threads_per_job < 1 or cfg.gpus_per_job < 1:
        raise UserError(f"{path}: jobs, threads_per_job and gpus_per_job must be ≥ 1")
    if cfg.stack_jobs not in ("split", "single"):
        raise UserError(f"{path}: stack_jobs must be split or single, got {cfg.stack_jobs!r}")
    if cfg.n_folds < 2:
        raise UserError(f"{path}: n_folds must be ≥ 2 (out-of-fold predictions), got {cfg.n_folds}")
    return dataclasses.replace(cfg, models=models, stack=stack)
