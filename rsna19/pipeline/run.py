"""``run_pipeline``: one RSNA-layout folder → ``WORK/submission.csv`` and ``WORK/scores.csv``, stage by stage.

Stages and what marks them done (a done stage is skipped on re-run, so a killed run resumes where it stopped):

=========  ===================================================  ============================================
stage      writes                                               done when
=========  ===================================================  ============================================
index      ``WORK/index.parquet`` (+ ``index_errors.csv``)      the parquet exists
convert    ``WORK/cache/`` (+ ``cache_index.parquet``)          every series is current (checked per series)
folds      ``WORK/folds.csv``                                   the csv exists (written once)
train      ``WORK/runs/<model>/fold_<k>/`` checkpoints, log      ``log.csv`` reached the config's last epoch
predict    ``WORK/runs/<model>/fold_<k>/{oof,test}.parquet``    both exist and are newer than ``best.pt``
stack      ``WORK/stack/<name>/`` (scores, oof, test)           ``scores.csv`` newer than every prediction
submit     ``WORK/submission.csv``, ``WORK/scores.csv``         newer than the stack's ``scores.csv``
=========  ===================================================  ============================================

After the folds stage two leakage checks run (DESIGN, issue 8): no patient is in two folds and no test slice,
series or patient is among the training rows; a failure stops the run before anything is trained.
Each stage prints one progress line; the run ends with the score table (per base model and stacked, OOF and
test) and the time of each stage, also written to ``WORK/pipeline_summary.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rsna19.config import load_config, save_config
from rsna19.errors import UserError
from rsna19.pipeline.config import PipelineConfig
from rsna19.utils.atomic import write_text

log = logging.getLogger(__name__)

#: Stage names in order (also the keys of the timing table).
STAGES: tuple[str, ...] = ("index", "convert", "folds", "train", "predict", "stack", "submit")
SPLITS: tuple[str, ...] = ("oof", "test")


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


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` did.

    Attributes:
        work: the work folder.
        scores: the stack's score table (base models, mean, stackers, blend; OOF and test).
        timings: stage → seconds (0 for a stage that was skipped entirely).
        skipped: stage → True when everything in it was already done.
        submission: the submission csv.
        submission_scores: its scores against the test labels, when the folder has them.
    """

    work: Path
    scores: pd.DataFrame
    timings: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, bool] = field(default_factory=dict)
    submission: Path | None = None
    submission_scores: dict[str, float] | None = None


def train_overrides(cfg: PipelineConfig, model: str) -> list[str]:
    """The dotted overrides of one base model: the pipeline's, the model's own, then the device."""
    out = [*cfg.train_overrides, *cfg.model_overrides.get(model, [])]
    if cfg.device != "auto":
        out.append(f"train.device={cfg.device}")
    return out


def load_train_config(cfg: PipelineConfig, config_path: str, paths: WorkPaths) -> Any:
    """The resolved :class:`~rsna19.training.config.TrainConfig` of one base model in this pipeline."""
    from rsna19.training.config import TrainConfig, resolve_paths

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


def train_done(fold_dir: Path, epochs: int) -> bool:
    """True when ``fold_dir`` holds ``best.pt`` and ``log.csv`` reached epoch ``epochs - 1``."""
    log_csv = fold_dir / "log.csv"
    if not (fold_dir / "best.pt").is_file() or not log_csv.is_file():
        return False
    try:
        epochs_done = pd.read_csv(log_csv)["epoch"]
    except (OSError, ValueError, KeyError):
        return False
    return len(epochs_done) > 0 and int(epochs_done.max()) >= epochs - 1


def _newer(path: Path, *than: Path) -> bool:
    """``path`` exists and is at least as new as every existing file of ``than``."""
    if not path.is_file():
        return False
    t = path.stat().st_mtime
    return all(t >= p.stat().st_mtime for p in than if p.is_file())


def _job_init(threads: int) -> None:
    """Pool-process initialiser: ``threads`` torch threads (the parent's setting does not carry over)."""
    import torch

    torch.set_num_threads(threads)


def _timed(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0


def run_jobs(
    jobs: list[tuple],
    n_jobs: int,
    threads_per_job: int = 1,
    on_done: Callable[[Any, float], None] | None = None,
) -> None:
    """Run ``(key, fn, args[, kwargs])`` jobs, in this process (``n_jobs`` ≤ 1) or in ``n_jobs`` processes.

    Processes are spawned (never forked: a forked torch with threads may deadlock) and reused; ``fn`` must be a
    module-level function with picklable arguments. ``on_done(key, seconds)`` runs in this process in completion
    order. The first failure cancels the jobs not yet started and is raised once the running ones end: what
    finished stays finished, so a re-run resumes.
    """
    norm = [(j[0], j[1], j[2], j[3] if len(j) > 3 else {}) for j in jobs]
    if n_jobs <= 1 or len(norm) <= 1:
        for key, fn, args, kwargs in norm:
            seconds = _timed(fn, args, kwargs)
            if on_done:
                on_done(key, seconds)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(min(n_jobs, len(norm)), ctx, _job_init, (threads_per_job,)) as pool:
        futures = {pool.submit(_timed, fn, args, kwargs): key for key, fn, args, kwargs in norm}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)  # report each job as it ends
            for f in done:
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise f.exception()
                if on_done:
                    on_done(futures[f], f.result())


def check_no_leakage(cache_index: pd.DataFrame, folds: pd.DataFrame) -> None:
    """The two invariants every score relies on.

    Raises:
        UserError: a patient listed in two folds, a test slice / series / patient among the training rows, or a
            training patient without a fold.
    """
    if folds["patient_id"].duplicated().any():
        dup = folds.loc[folds["patient_id"].duplicated(), "patient_id"].iloc[0]
        raise UserError(f"folds: patient {dup} is listed in more than one fold")
    train = cache_index[cache_index["split"] == "train"]
    test = cache_index[cache_index["split"] != "train"]
    for col, what in (("sop_uid", "slice"), ("series_uid", "series"), ("patient_id", "patient")):
        shared = set(train[col].astype(str)) & set(test[col].astype(str))
        if shared:
            raise UserError(
                f"leakage: {len(shared)} test {what}(s) also among the training rows (e.g. {sorted(shared)[0]}); "
                "test data must never reach training"
            )
    in_folds = set(folds["patient_id"].astype(str))
    test_in_folds = set(test["patient_id"].astype(str)) & in_folds
    if test_in_folds:
        raise UserError(f"leakage: test patient {sorted(test_in_folds)[0]} has a training fold")
    missing = set(train["patient_id"].astype(str)) - in_folds
    if missing:
        raise UserError(f"folds: {len(missing)} training patient(s) have no fold, e.g. {sorted(missing)[0]}")


def _submission_frame(stack_dir: Path, which: str, layout: DataLayout) -> tuple[pd.DataFrame, list[str] | None, int]:
    """The stacked test predictions in the sample submission's slice order; unreadable test slices get the mean.

    Returns:
        (wide frame ``sop_uid, p_*``, the expected SOPs or None, how many slices were filled in).
    """
    from rsna19.constants import PROB_COLUMNS
    from rsna19.io.rsna_csv import read_long, split_ids
    from rsna19.stacking.submit import stack_test_predictions

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


class _Stage:
    """Times one stage and prints its progress line."""

    def __init__(self, name: str, timings: dict[str, float], skipped: dict[str, bool], say: Callable[[str], None]):
        self.name, self.timings, self.skipped, self.say = name, timings, skipped, say
        self.t0 = time.perf_counter()

    def done(self, message: str, skipped: bool = False) -> None:
        seconds = time.perf_counter() - self.t0
        self.timings[self.name] = seconds
        self.skipped[self.name] = skipped
        state = "skipped" if skipped else f"{seconds:7.1f} s"
        self.say(f"[{STAGES.index(self.name) + 1}/{len(STAGES)}] {self.name:<8} {state:>10}  {message}")


def run_pipeline(
    data_dir: str | os.PathLike[str],
    work: str | os.PathLike[str],
    cfg: PipelineConfig,
    *,
    progress: bool = False,
    say: Callable[[str], None] = print,
) -> PipelineResult:
    """Run every stage of ``cfg`` on ``data_dir`` into ``work``, skipping what is already done.

    Args:
        data_dir: RSNA-layout folder (``stage_2_train/``, ``stage_2_train.csv``, ``stage_2_test/`` ...).
        work: output folder (created).
        cfg: the pipeline (from :func:`rsna19.pipeline.config.load_pipeline`, config paths resolved).
        progress: show the stages' own progress bars (index, convert, training batches).
        say: where the progress lines go.

    Returns:
        The scores, timings and output paths.

    Raises:
        UserError: a data folder not in the RSNA layout, leakage between folds or splits, or any stage's error.
    """
    from rsna19.conversion.run import run_convert
    from rsna19.data.datasets import read_cache_index
    from rsna19.data.folds import read_folds, write_folds
    from rsna19.inference.predict import predict
    from rsna19.io.index import build_index
    from rsna19.stacking.config import StackConfig
    from rsna19.stacking.run import DONE_FILE, run_stack, stack_dir
    from rsna19.submission import score_submission, write_submission
    from rsna19.training.trainer import train

    layout = find_layout(data_dir)
    paths = WorkPaths(Path(work))
    paths.work.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.resolved)
    timings: dict[str, float] = {}
    skipped: dict[str, bool] = {}

    # 1. index
    st = _Stage("index", timings, skipped, say)
    existed = paths.index.is_file()
    dirs = [layout.train_dir] + ([layout.test_dir] if layout.test_dir else [])
    index = build_index(
        [str(d) for d in dirs], str(layout.train_csv), paths.index, cfg.index_workers, progress=progress
    )
    n_err = len(pd.read_csv(paths.index.with_name("index_errors.csv"))) if not existed else None
    st.done(
        f"{len(index)} slices, {index['series_uid'].nunique()} series"
        + (f", {n_err} unusable file(s) in index_errors.csv" if n_err else ""),
        skipped=existed,
    )

    # 2. convert
    st = _Stage("convert", timings, skipped, say)
    c = cfg.convert
    summary = run_convert(
        paths.index,
        paths.cache,
        workers=c.workers,
        crop=c.crop,
        spacing=c.spacing,
        correct_tilt=c.correct_tilt,
        progress=progress,
    )
    st.done(
        f"{summary.n_series} series: {summary.converted} converted, {summary.skipped} up to date, "
        f"{summary.failed} failed",
        skipped=summary.converted == 0 and summary.failed == 0,
    )

    # 3. folds + leakage checks
    st = _Stage("folds", timings, skipped, say)
    existed = paths.folds.is_file()
    write_folds(paths.cache, paths.folds, n_folds=cfg.n_folds, seed=cfg.folds_seed)
    folds = read_folds(paths.folds)
    n_folds = int(folds["fold"].max()) + 1
    if n_folds != cfg.n_folds:
        raise UserError(f"{paths.folds} has {n_folds} folds, the pipeline wants {cfg.n_folds}; delete it to remake")
    cache_index = read_cache_index(paths.cache)
    check_no_leakage(cache_index, folds)
    n_test = int((cache_index["split"] != "train").sum())
    st.done(f"{len(folds)} patients in {n_folds} folds; no leakage ({n_test} test slices kept out)", skipped=existed)
    if n_test == 0:
        raise UserError(f"no test slices in {paths.cache}: is {layout.root}/stage_2_test/ there and readable?")

    # 4. train every model × fold
    st = _Stage("train", timings, skipped, say)
    train_cfgs = {Path(p).stem: load_train_config(cfg, p, paths) for p in cfg.models}
    todo = [
        (name, k)
        for name, tc in train_cfgs.items()
        for k in range(n_folds)
        if not train_done(paths.runs / name / f"fold_{k}", tc.train.epochs)
    ]

    def trained_line(job: tuple[str, int], seconds: float) -> None:
        name, k = job
        best = pd.read_csv(paths.runs / name / f"fold_{k}" / "log.csv")["val_wll"].min()
        say(f"      train {name} fold {k}: {seconds:.1f} s, best val wll {best:.4f}")

    run_jobs([(job, train, (train_cfgs[job[0]], job[1])) for job in todo], cfg.jobs, cfg.threads_per_job, trained_line)
    trained = len(todo)
    total = len(train_cfgs) * n_folds
    st.done(f"{total} model × fold runs, {trained} trained, {total - trained} already done", skipped=trained == 0)

    # 5. predict OOF and test
    st = _Stage("predict", timings, skipped, say)
    pjobs = []
    for name in train_cfgs:
        for k in range(n_folds):
            fold_dir = paths.runs / name / f"fold_{k}"
            for split in ("oof", "test"):
                if not _newer(fold_dir / f"{split}.parquet", fold_dir / "best.pt"):
                    kwargs = {
                        "tta": cfg.tta,
                        "device": cfg.device,
                        "batch_size": cfg.predict_batch_size,
                        "progress": progress and cfg.jobs <= 1,  # bars of parallel jobs would interleave
                    }
                    pjobs.append(((name, k, split), predict, (fold_dir, k, split), kwargs))
    run_jobs(pjobs, cfg.jobs, cfg.threads_per_job)
    predicted = len(pjobs)
    total = 2 * len(train_cfgs) * n_folds
    st.done(f"{total} prediction files (TTA {'+'.join(cfg.tta)}), {predicted} written", skipped=predicted == 0)

    # 6. stack
    st = _Stage("stack", timings, skipped, say)
    scfg = load_config(StackConfig, cfg.stack, stack_overrides(cfg, paths, layout))
    sdir = stack_dir(scfg)
    preds = [paths.runs / n / f"fold_{k}" / f"{s}.parquet" for n in train_cfgs for k in range(n_folds) for s in SPLITS]
    fresh = _newer(sdir / DONE_FILE, *preds)
    result = run_stack(scfg, force=not fresh)
    best = result.scores.loc[result.scores["wll_oof"].idxmin()]
    st.done(f"{sdir}: best OOF {best['name']} {best['wll_oof']:.4f}", skipped=result.skipped)

    # 7. submission (+ score when the folder has test labels)
    st = _Stage("submit", timings, skipped, say)
    fresh = _newer(paths.submission, sdir / DONE_FILE) and _newer(paths.scores, sdir / DONE_FILE)
    n_filled = 0
    if not fresh:
        wide, expected, n_filled = _submission_frame(sdir, cfg.submit, layout)
        write_submission(wide, paths.submission, expected_sops=expected)
        shutil.copyfile(sdir / DONE_FILE, paths.work / f".{paths.scores.name}.tmp")
        os.replace(paths.work / f".{paths.scores.name}.tmp", paths.scores)
    sub_scores = score_submission(paths.submission, layout.test_labels) if layout.test_labels else None
    msg = f"{paths.submission} ({cfg.submit})"
    if n_filled:
        msg += f", {n_filled} unreadable test slice(s) filled with the mean"
    if sub_scores is not None:
        msg += f"; test wll {sub_scores['wll']:.4f} on {int(sub_scores['n_slices'])} labelled slices"
    st.done(msg, skipped=fresh)

    out = PipelineResult(paths.work, result.scores, timings, skipped, paths.submission, sub_scores)
    write_text(json.dumps(summary_dict(cfg, out), indent=2) + "\n", paths.summary)
    return out


def summary_dict(cfg: PipelineConfig, result: PipelineResult) -> dict[str, Any]:
    """JSON-ready summary of a run (``pipeline_summary.json``)."""
    scores = result.scores.astype(object).where(result.scores.notna(), None)
    return {
        "pipeline": cfg.name,
        "models": cfg.model_names,
        "timings_s": {k: round(v, 2) for k, v in result.timings.items()},
        "skipped": result.skipped,
        "scores": scores.to_dict("records"),
        "submission": str(result.submission) if result.submission else None,
        "submission_scores": result.submission_scores,
    }


def format_result(result: PipelineResult) -> str:
    """The final table: per-model and stacked weighted log loss (OOF and test), then the time of each stage."""
    import math

    lines = ["", "weighted log loss (lower is better; OOF = out-of-fold on train, test = held-out test labels)"]
    rows = [("model", "kind", "OOF", "test")]
    for _, r in result.scores.iterrows():
        test = "" if r["wll_test"] is None or math.isnan(float(r["wll_test"])) else f"{float(r['wll_test']):.4f}"
        rows.append((str(r["name"]), str(r["kind"]), f"{float(r['wll_oof']):.4f}", test))
    if result.submission_scores is not None:
        rows.append(("submission.csv", "scored", "", f"{result.submission_scores['wll']:.4f}"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, r in enumerate(rows):
        lines.append(f"  {r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}")
        if i == 0:
            lines.append("  " + "  ".join("-" * x for x in w))
    lines += ["", "time per stage"]
    for s, seconds in result.timings.items():
        flag = " (skipped: already done)" if result.skipped.get(s) else ""
        lines.append(f"  {s:<8} {seconds:8.1f} s{flag}")
    lines.append(f"  {'total':<8} {sum(result.timings.values()):8.1f} s")
    return "\n".join(lines)


@contextlib.contextmanager
def quiet_logs(quiet: bool = True) -> Iterator[None]:
    """Keep the package's INFO logs (one a training epoch, one a stage step) off the console during a run.

    The pipeline prints its own line per stage; warnings and errors still show.
    """
    logger = logging.getLogger("rsna19")
    old = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)
