"""The pipeline as a graph of jobs: each knows whether it is done, how to run itself, and its shell commands.

:func:`plan` turns a pipeline config into :class:`Job` objects in dependency order. The local runner
(:mod:`rsna19.pipeline.run`), ``--print-jobs`` (:mod:`rsna19.pipeline.jobs`) and the SLURM executor
(:mod:`rsna19.pipeline.slurm`) all use the same objects, so what is printed is what runs.

=================  =========================================  ==============================================
job key            waits for                                  done when
=================  =========================================  ==============================================
``index``          —                                          ``index.parquet`` exists
``convert``        ``index``                                  ``cache_index.parquet`` newer than the index
``folds``          ``convert``                                ``folds.csv`` exists (leakage checked on run)
``train/M/fold_k`` ``folds`` (+ the embeddings it reads)      ``log.csv`` reached the config's last epoch
``embed/M/fold_k`` ``train/M/fold_k``                         every split it writes is newer than ``best.pt``
``predict/M/...``  ``train/M/fold_k`` (+ ``embed/…`` it reads)  ``oof`` and ``test`` parquets newer than ``best.pt``
``stack``          every ``predict/…``                        the stack's ``scores.csv`` newer than every parquet
``stack/features`` every ``predict/…`` (``stack_jobs: split``) ``level2/meta.json`` newer than every parquet
``stack/S/fold_k`` ``stack/features``                         its fit newer than the level-2 features
``stack`` (split)  ``stack/features`` and every ``stack/S/…``   ``scores.csv`` newer than the fits and parquets
``submit``         ``stack``                                  ``submission.csv`` newer than the stack's scores
=================  =========================================  ==============================================

A sequence model reads the embeddings of the image model named by its ``data.embeddings``: an ``embed`` job per
fold of that image model writes them (the splits every sequence model needs: ``oof`` + ``test``, and ``train``
when one trains on its own fold's embeddings), and the sequence model's fold-k training waits for the ``embed``
jobs of the folds it reads (every fold with ``embedding_source: oof``, fold k alone with ``fold``, every fold with
``fold`` and ``train_logits: oof``). With one TTA view,
an embedded image model's ``predict`` job also waits for its own ``embed`` job and writes the embeddings' logits as
its predictions instead of a second pass (:func:`rsna19.inference.predict.predictions_from_embeddings`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rsna19.conversion.run import run_convert
from rsna19.core.config import load_config, to_dict
from rsna19.core.errors import UserError
from rsna19.core.threads import machine_cpus
from rsna19.data.datasets import read_cache_index
from rsna19.data.embeddings import embedding_paths
from rsna19.data.folds import read_folds, write_folds
from rsna19.engine.embed import CheckpointOptions, extract_embeddings
from rsna19.engine.tasks import SequenceTask, get_task
from rsna19.inference.predict import predict
from rsna19.inference.submission import write_submission
from rsna19.io.index import build_index
from rsna19.nets import get_model_spec
from rsna19.pipeline.config import PipelineConfig
from rsna19.pipeline.layout import (
    DataLayout,
    WorkPaths,
    check_no_leakage,
    find_layout,
    load_train_config,
    newer,
    stack_overrides,
    submission_frame,
    train_done,
    train_overrides,
)
from rsna19.pipeline.slurm import Resources
from rsna19.stacking.config import StackConfig
from rsna19.stacking.parts import (
    finish_stack,
    fit_jobs,
    fit_path,
    fits_current,
    level2_done_file,
    run_features,
    run_fit,
)
from rsna19.stacking.run import DONE_FILE, run_stack, stack_dir, stack_warnings
from rsna19.training.trainer import train

log = logging.getLogger(__name__)

#: Stage names in run order (the timing table's rows); every job belongs to one.
STAGES: tuple[str, ...] = ("index", "convert", "folds", "train", "embed", "predict", "stack", "submit")
SPLITS: tuple[str, ...] = ("oof", "test")


@dataclass
class Context:
    """What every job of one pipeline shares: the config, the data layout, the work folder's paths."""

    cfg: PipelineConfig
    layout: DataLayout
    paths: WorkPaths
    progress: bool = False
    train_cfgs: dict[str, Any] = field(default_factory=dict)  # run name → resolved TrainConfig
    config_paths: dict[str, str] = field(default_factory=dict)  # run name → its YAML

    @property
    def on_gpu(self) -> bool:
        """True when the models run on GPUs (``device`` is not ``cpu``)."""
        return self.cfg.device != "cpu"


class Job:
    """One unit of work; subclasses fill in :meth:`done`, :meth:`run` and :meth:`commands`.

    Attributes:
        key: unique name (``train/clf2d/fold_0``); the first part is the stage.
        deps: keys of the jobs that must finish first.
        resources: what it asks for.
        pooled: runs in a worker process of the local runner (model jobs); else in the runner itself.
    """

    stage: str = ""
    pooled: bool = False

    def __init__(self, ctx: Context, key: str, deps: tuple[str, ...] = (), resources: Resources | None = None):
        self.ctx = ctx
        self.key = key
        self.deps = tuple(deps)
        self.resources = resources or Resources()

    def done(self) -> bool:
        """True when the job's outputs are complete and current (a re-run skips it)."""
        raise NotImplementedError

    def run(self) -> str:
        """Do the work in this process; returns a short message for the stage line."""
        raise NotImplementedError

    def commands(self) -> list[list[str]]:
        """The same work as shell commands (argv lists, run in order)."""
        raise NotImplementedError

    def summary(self) -> str:
        """A short message about the outputs when the job was already done."""
        return "already done"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key!r}, deps={list(self.deps)})"


def _argv(*parts: object) -> list[str]:
    return [str(p) for p in parts]


# ------------------------------------------------------------------------------------------------ data stages
class IndexJob(Job):
    """``rsna19 index``: one row a slice of the training and test folders."""

    stage = "index"

    def _dirs(self) -> list[Path]:
        lay = self.ctx.layout
        return [lay.train_dir] + ([lay.test_dir] if lay.test_dir else [])

    def done(self) -> bool:
        return self.ctx.paths.index.is_file()

    def run(self) -> str:
        c, p = self.ctx.cfg, self.ctx.paths
        index = build_index(
            [str(d) for d in self._dirs()], str(self.ctx.layout.train_csv), p.index, c.index_workers, self.ctx.progress
        )
        n_err = len(pd.read_csv(p.index.with_name("index_errors.csv")))
        return f"{len(index)} slices, {index['series_uid'].nunique()} series" + (
            f", {n_err} unusable file(s) in index_errors.csv" if n_err else ""
        )

    def summary(self) -> str:
        index = pd.read_parquet(self.ctx.paths.index, columns=["series_uid"])
        return f"{len(index)} slices, {index['series_uid'].nunique()} series"

    def commands(self) -> list[list[str]]:
        p, c = self.ctx.paths, self.ctx.cfg
        return [
            _argv("rsna19", "index", *self._dirs(), "--labels", self.ctx.layout.train_csv, "--out", p.index)
            + _argv("--workers", c.index_workers)
        ]


class ConvertJob(Job):
    """``rsna19 convert``: HU volumes in spatial order, tilt-corrected and cropped, into the cache."""

    stage = "convert"

    def done(self) -> bool:
        p = self.ctx.paths
        return newer(p.cache / "cache_index.parquet", p.index)

    def run(self) -> str:
        c, p = self.ctx.cfg.convert, self.ctx.paths
        s = run_convert(
            p.index,
            p.cache,
            workers=c.workers,
            crop=c.crop,
            spacing=c.spacing,
            correct_tilt=c.correct_tilt,
            progress=self.ctx.progress,
        )
        return f"{s.n_series} series: {s.converted} converted, {s.skipped} up to date, {s.failed} failed"

    def summary(self) -> str:
        cache_index = pd.read_parquet(self.ctx.paths.cache / "cache_index.parquet", columns=["series_uid"])
        return f"{cache_index['series_uid'].nunique()} series up to date"

    def commands(self) -> list[list[str]]:
        c, p = self.ctx.cfg.convert, self.ctx.paths
        argv = _argv("rsna19", "convert", p.index, "--out", p.cache, "--workers", c.workers, "--crop", c.crop or 0)
        if c.spacing:
            argv += _argv("--spacing", c.spacing)
        if not c.correct_tilt:
            argv.append("--no-tilt-correction")
        return [argv]


class FoldsJob(Job):
    """``rsna19 folds`` and the leakage checks: nothing trains before they pass."""

    stage = "folds"

    def done(self) -> bool:
        return self.ctx.paths.folds.is_file()

    def run(self) -> str:
        c, p = self.ctx.cfg, self.ctx.paths
        write_folds(p.cache, p.folds, n_folds=c.n_folds, seed=c.folds_seed)
        return self.check()

    def check(self) -> str:
        """Folds agree with the pipeline and nothing leaks; returns the stage message.

        Raises:
            UserError: another number of folds, leakage, or no test slice.
        """
        c, p = self.ctx.cfg, self.ctx.paths
        folds = read_folds(p.folds)
        n_folds = int(folds["fold"].max()) + 1
        if n_folds != c.n_folds:
            raise UserError(f"{p.folds} has {n_folds} folds, the pipeline wants {c.n_folds}; delete it to remake")
        cache_index = read_cache_index(p.cache)
        warnings = check_no_leakage(cache_index, folds)
        n_test = int((cache_index["split"] != "train").sum())
        if n_test == 0:
            raise UserError(f"no test slices in {p.cache}: is {self.ctx.layout.root}/stage_2_test/ readable?")
        msg = f"{len(folds)} patients in {n_folds} folds; no leakage ({n_test} test slices kept out)"
        return msg + "".join(f"; warning: {w}" for w in warnings)

    summary = check

    def commands(self) -> list[list[str]]:
        c, p = self.ctx.cfg, self.ctx.paths
        return [_argv("rsna19", "folds", p.cache, "--out", p.folds, "--n-folds", c.n_folds, "--seed", c.folds_seed)]


# ------------------------------------------------------------------------------------------------ model jobs
class ModelJob(Job):
    """A job on one fold of one base model; it runs in a worker of the local runner, on the device it is given."""

    pooled = True

    def __init__(self, ctx: Context, model: str, fold: int, deps: tuple[str, ...], resources: Resources):
        super().__init__(ctx, f"{self.stage}/{model}/fold_{fold}", deps, resources)
        self.model = model
        self.fold = fold

    @property
    def fold_dir(self) -> Path:
        return self.ctx.paths.runs / self.model / f"fold_{self.fold}"

    @property
    def device(self) -> str:
        """The device of the pipeline (a runner worker sees only its own GPUs, so ``cuda`` means those)."""
        return self.ctx.cfg.device


class TrainJob(ModelJob):
    """``rsna19 train CONFIG --fold k``: under ``torchrun`` when the pipeline gives each job several GPUs."""

    stage = "train"

    def done(self) -> bool:
        cfg = self.ctx.train_cfgs[self.model]
        return train_done(self.fold_dir, cfg.train.epochs, to_dict(cfg))

    def run(self) -> str:
        if self.ctx.on_gpu and self.ctx.cfg.gpus_per_job > 1:
            # torchrun in a child process: it sees this worker's GPUs (CUDA_VISIBLE_DEVICES of its slot).
            argv = self.commands()[0]
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise UserError(f"{self.key}: torchrun failed ({done.returncode}): {done.stderr[-2000:]}")
        else:
            train(self.ctx.train_cfgs[self.model], self.fold)
        best = pd.read_csv(self.fold_dir / "log.csv")["val_wll"].min()
        return f"best val wll {best:.4f}"

    def commands(self) -> list[list[str]]:
        p = self.ctx.paths
        args = _argv("train", self.ctx.config_paths[self.model], "--fold", self.fold)
        args += _argv("--cache", p.cache, "--folds", p.folds, "--runs", p.runs)
        args += [*train_overrides(self.ctx.cfg, self.model)]
        masks = self.ctx.train_cfgs[self.model].data.masks
        if masks:
            args += _argv("--masks", masks)
        g = self.ctx.cfg.gpus_per_job
        if self.ctx.on_gpu and g > 1:
            return [["torchrun", "--standalone", f"--nproc_per_node={g}", "-m", "rsna19", *args]]
        return [["rsna19", *args]]


class EmbedJob(ModelJob):
    """``rsna19 embed RUN --fold k``: the per-slice features a sequence model reads."""

    stage = "embed"

    def __init__(
        self, ctx: Context, model: str, fold: int, splits: tuple[str, ...], deps: tuple[str, ...], res: Resources
    ):
        super().__init__(ctx, model, fold, deps, res)
        self.splits = splits

    def _paths(self) -> list[Path]:
        return [embedding_paths(self.fold_dir, s)["json"] for s in self.splits]

    def done(self) -> bool:
        return all(newer(j, self.fold_dir / "best.pt") for j in self._paths())

    def run(self) -> str:
        extract_embeddings(
            self.fold_dir,
            self.fold,
            self.splits,
            CheckpointOptions(tta=self.ctx.cfg.tta, device=self.device),
            overwrite=True,
            progress=self.ctx.progress and self.ctx.cfg.jobs <= 1,
        )
        return f"{', '.join(self.splits)} embedded"

    def commands(self) -> list[list[str]]:
        argv = _argv("rsna19", "embed", self.fold_dir.parent, "--fold", self.fold, "--splits", *self.splits)
        return [argv + _argv("--tta", *self.ctx.cfg.tta, "--device", self.device, "--overwrite")]


class PredictJob(ModelJob):
    """``rsna19 predict RUN --fold k --split oof|test``: the parquets the stack reads."""

    stage = "predict"

    def _outputs(self) -> list[Path]:
        return [self.fold_dir / f"{s}.parquet" for s in SPLITS]

    def done(self) -> bool:
        return all(newer(p, self.fold_dir / "best.pt") for p in self._outputs())

    def run(self) -> str:
        options = CheckpointOptions(
            tta=self.ctx.cfg.tta, device=self.device, batch_size=self.ctx.cfg.predict_batch_size
        )
        for split in SPLITS:
            predict(
                self.fold_dir,
                self.fold,
                split,
                options,
                progress=self.ctx.progress and self.ctx.cfg.jobs <= 1,  # bars of parallel jobs would interleave
            )
        return "oof + test written"

    def commands(self) -> list[list[str]]:
        out = []
        for split in SPLITS:
            argv = _argv("rsna19", "predict", self.fold_dir.parent, "--fold", self.fold, "--split", split)
            argv += _argv("--tta", *self.ctx.cfg.tta, "--device", self.device)
            if self.ctx.cfg.predict_batch_size:
                argv += _argv("--batch-size", self.ctx.cfg.predict_batch_size)
            out.append(argv)
        return out


# ------------------------------------------------------------------------------------------------ second level
def stack_threads(cfg: PipelineConfig, pooled: bool) -> int:
    """Threads of a stack job, what its ``num_threads: auto`` resolves to: the pipeline's ``threads_per_job`` for a
    job that runs in a worker process next to others (``jobs > 1``), else every core of the machine."""
    return max(1, cfg.threads_per_job) if pooled and cfg.jobs > 1 else machine_cpus()


class _StackPart(Job):
    """A job of the second level: it knows the stack config and the base-model predictions it reads."""

    stage = "stack"

    def __init__(self, ctx: Context, key: str, deps: tuple[str, ...], resources: Resources):
        super().__init__(ctx, key, deps, resources)
        self.overrides = stack_overrides(ctx.cfg, ctx.paths, ctx.layout)

    @property
    def threads(self) -> int:
        """Threads the job's stackers use (``num_threads: auto``): its CPUs (``RSNA19_THREADS`` when it runs)."""
        return self.resources.cpus

    def config(self) -> StackConfig:
        return load_config(StackConfig, self.ctx.cfg.stack, self.overrides)

    def _predictions(self) -> list[Path]:
        c, p = self.ctx.cfg, self.ctx.paths
        return [
            p.runs / n / f"fold_{k}" / f"{s}.parquet" for n in c.model_names for k in range(c.n_folds) for s in SPLITS
        ]

    def _argv(self, *extra: object) -> list[str]:
        return _argv("rsna19", "stack", self.ctx.cfg.stack, *self.overrides, *extra)


class StackFeaturesJob(_StackPart):
    """``rsna19 stack --part features``: the level-2 features of a split stack, built once for every fit job."""

    def __init__(self, ctx: Context, deps: tuple[str, ...]):
        super().__init__(ctx, "stack/features", deps, Resources(cpus=1, mem_gb=16))

    def done(self) -> bool:
        return newer(level2_done_file(self.config()), *self._predictions())

    def run(self) -> str:
        return f"level-2 features in {run_features(self.config())}"

    def commands(self) -> list[list[str]]:
        return [self._argv("--part", "features")]


class StackFitJob(_StackPart):
    """``rsna19 stack --part fit --stacker S --fold K``: one stacker on one level-2 fold; it runs in a worker next
    to the other fits (``jobs``), with the threads of its resources."""

    pooled = True

    def __init__(self, ctx: Context, stacker: str, fold: int, deps: tuple[str, ...]):
        cpus = stack_threads(ctx.cfg, pooled=True)
        super().__init__(ctx, f"stack/{stacker}/fold_{fold}", deps, Resources(cpus=cpus, mem_gb=16))
        self.model = stacker  # the stage line names it like a model job's
        self.fold = fold

    def done(self) -> bool:
        return fits_current(self.config(), self.model, self.fold)

    def run(self) -> str:
        run_fit(self.config(), self.model, self.fold)
        return f"{self.threads} thread(s)"

    def commands(self) -> list[list[str]]:
        return [self._argv("--part", "fit", "--stacker", self.model, "--fold", self.fold)]


class StackJob(_StackPart):
    """``rsna19 stack``: level-2 features, stackers, blend and the score table, in one job; or, for a split stack
    (``stack_jobs: split``), the final job that combines the fit jobs' results, blends and scores."""

    def __init__(self, ctx: Context, deps: tuple[str, ...], split: bool = False):
        super().__init__(ctx, "stack", deps, Resources(cpus=stack_threads(ctx.cfg, pooled=False), mem_gb=16))
        self.split = split

    def done(self) -> bool:
        cfg = self.config()
        if self.split:
            inputs = [level2_done_file(cfg), *(fit_path(cfg, s, k) for s, k in fit_jobs(cfg, self.ctx.cfg.n_folds))]
            return newer(stack_dir(cfg) / DONE_FILE, *inputs, *self._predictions())
        return newer(stack_dir(cfg) / DONE_FILE, *self._predictions())

    def run(self) -> str:
        result = (finish_stack if self.split else run_stack)(self.config(), force=True)
        best = result.scores.loc[result.scores["wll_oof"].idxmin()]
        warn = "".join(f"; WARNING {w}" for w in _warnings(result.scores))
        return f"{result.out_dir}: best OOF {best['name']} {best['wll_oof']:.4f}{warn}"

    def summary(self) -> str:
        scores = pd.read_csv(stack_dir(self.config()) / DONE_FILE)
        best = scores.loc[scores["wll_oof"].idxmin()]
        return f"best OOF {best['name']} {best['wll_oof']:.4f}"

    def commands(self) -> list[list[str]]:
        return [self._argv(*(("--part", "finish") if self.split else ()), "--force")]


def _warnings(scores: pd.DataFrame) -> list[str]:
    return stack_warnings(scores)


def stack_jobs(ctx: Context, predict_keys: tuple[str, ...]) -> list[Job]:
    """The second level's jobs: one ``stack`` job, or with ``stack_jobs: split`` the features job, a fit job per
    enabled stacker × fold (the cluster's unit: LightGBM's level-2 CV is hours at RSNA size) and the final job."""
    if ctx.cfg.stack_jobs == "single":
        return [StackJob(ctx, predict_keys)]

    features = StackFeaturesJob(ctx, predict_keys)
    fits = [StackFitJob(ctx, s, k, (features.key,)) for s, k in fit_jobs(features.config(), ctx.cfg.n_folds)]
    final = StackJob(ctx, (features.key, *(f.key for f in fits)), split=True)
    return [features, *fits, final]


class SubmitJob(Job):
    """The submission csv in the sample submission's order (+ its score when the data has test labels)."""

    stage = "submit"

    def __init__(self, ctx: Context, stack: StackJob):
        super().__init__(ctx, "submit", (stack.key,), Resources(cpus=1, mem_gb=8))
        self.stack = stack

    def _stack_dir(self) -> Path:
        return stack_dir(self.stack.config())

    def done(self) -> bool:
        p = self.ctx.paths
        done_file = self._stack_dir() / DONE_FILE
        return newer(p.submission, done_file) and newer(p.scores, done_file)

    def run(self) -> str:
        p, sdir = self.ctx.paths, self._stack_dir()
        wide, expected, n_filled = submission_frame(sdir, self.ctx.cfg.submit, self.ctx.layout)
        write_submission(wide, p.submission, expected_sops=expected)
        shutil.copyfile(sdir / DONE_FILE, p.work / f".{p.scores.name}.tmp")
        os.replace(p.work / f".{p.scores.name}.tmp", p.scores)
        msg = f"{p.submission} ({self.ctx.cfg.submit})"
        if n_filled:
            msg += f", {n_filled} unreadable test slice(s) filled with the mean"
        return msg

    def summary(self) -> str:
        return f"{self.ctx.paths.submission} ({self.ctx.cfg.submit})"

    def commands(self) -> list[list[str]]:
        p, lay = self.ctx.paths, self.ctx.layout
        argv = _argv("rsna19", "submit", self._stack_dir(), "--out", p.submission, "--which", self.ctx.cfg.submit)
        if lay.sample_submission:
            argv += _argv("--sample-submission", lay.sample_submission)
        return [argv, _argv("cp", self._stack_dir() / DONE_FILE, p.scores)]


# ------------------------------------------------------------------------------------------------ the plan
def model_resources(cfg: PipelineConfig) -> Resources:
    """Resources of a model job: the pipeline's GPUs per job, its threads and loader workers."""
    gpus = cfg.gpus_per_job if cfg.device != "cpu" else 0
    return Resources(gpus=gpus, cpus=max(1, cfg.threads_per_job), mem_gb=16.0 if gpus else 4.0, time_min=24 * 60)


def _reads_embeddings(tc: Any) -> bool:
    """Whether the family of training config ``tc`` reads another run's embeddings (its registered trait)."""
    return get_model_spec(tc.model.name).reads_embeddings


def embedding_splits(train_cfgs: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Image run → the embedding splits the models reading its embeddings need (``oof``, ``test``, and ``train``
    for ``data.embedding_source: fold``).

    Raises:
        UserError: a model reading the embeddings of a run that is not in the pipeline or gives none.
    """
    out: dict[str, set[str]] = {}
    for name, tc in train_cfgs.items():
        if not _reads_embeddings(tc):
            continue
        image = tc.data.embeddings
        if image not in train_cfgs:
            raise UserError(
                f"model {name!r} reads the embeddings of {image!r}, which is not in the pipeline's models "
                f"({', '.join(train_cfgs)}): add its config to `models`"
            )
        if not get_task(train_cfgs[image]).can_embed:
            raise UserError(f"model {name!r} reads embeddings of {image!r}, a {train_cfgs[image].model.name} model")
        out.setdefault(image, {"oof", "test"})
        if tc.data.embedding_source == "fold":
            out[image].add("train")
    return {k: tuple(s for s in ("train", "oof", "test") if s in v) for k, v in out.items()}


def plan(
    data_dir: str | os.PathLike[str], work: str | os.PathLike[str], cfg: PipelineConfig, progress: bool = False
) -> list[Job]:
    """Every job of the pipeline, dependencies before dependents.

    Raises:
        UserError: a data folder not in the RSNA layout, or a model config that does not load.
    """
    layout = find_layout(data_dir)
    paths = WorkPaths(Path(work))
    ctx = Context(cfg, layout, paths, progress)
    masks = layout.root / "masks"
    for config in cfg.models:
        name = Path(config).stem
        tc = load_train_config(cfg, config, paths)
        if get_model_spec(tc.model.name).masks and tc.data.masks is None and cfg.masks and masks.is_dir():
            tc.data.masks = str(masks)  # families that learn from masks use the data's masks when there are any
        ctx.train_cfgs[name] = tc
        ctx.config_paths[name] = config
    res = model_resources(cfg)
    jobs: list[Job] = [
        IndexJob(ctx, "index", (), Resources(cpus=cfg.index_workers)),
        ConvertJob(ctx, "convert", ("index",), Resources(cpus=cfg.convert.workers)),
        FoldsJob(ctx, "folds", ("convert",)),
    ]
    embeds = embedding_splits(ctx.train_cfgs)
    # Image models first, then the models that read their embeddings: the list stays in dependency order.
    order = sorted(ctx.train_cfgs, key=lambda n: _reads_embeddings(ctx.train_cfgs[n]))
    for name in order:
        tc = ctx.train_cfgs[name]
        upstream = tc.data.embeddings if _reads_embeddings(tc) else None
        for k in range(cfg.n_folds):
            deps: tuple[str, ...] = ("folds",)
            if upstream:
                task = get_task(tc)
                if isinstance(task, SequenceTask):
                    reads = sorted(task.train_sources(k, cfg.n_folds))
                else:  # another task reading embeddings: the rule of data.embedding_source alone, as before
                    reads = [k] if tc.data.embedding_source == "fold" else list(range(cfg.n_folds))
                deps += tuple(f"embed/{upstream}/fold_{j}" for j in reads)
            jobs.append(TrainJob(ctx, name, k, deps, res))
        if name in embeds:
            for k in range(cfg.n_folds):
                jobs.append(EmbedJob(ctx, name, k, embeds[name], (f"train/{name}/fold_{k}",), res))
        for k in range(cfg.n_folds):
            deps = (f"train/{name}/fold_{k}",) + ((f"embed/{upstream}/fold_{k}",) if upstream else ())
            if name in embeds and len(cfg.tta) == 1:
                # After its own embed job: the predictions are then the embeddings' logits (no second pass).
                deps += (f"embed/{name}/fold_{k}",)
            jobs.append(PredictJob(ctx, name, k, deps, res))
    second = stack_jobs(ctx, tuple(j.key for j in jobs if isinstance(j, PredictJob)))
    stack = second[-1]
    assert isinstance(stack, StackJob)
    jobs += [*second, SubmitJob(ctx, stack)]
    return jobs
