"""``run_pipeline``: one RSNA-layout folder → ``WORK/submission.csv`` and ``WORK/scores.csv``.

The pipeline is a graph of jobs (:func:`rsna19.pipeline.stages.plan`: index → convert → folds → train / embed /
predict per model × fold → stack → submit); a job whose outputs are complete is skipped, so a killed run resumes
where it stopped. Before anything runs, ``rsna19 doctor``'s checks for the pipeline (GPU, disk, pretrained
weights) stop a run that would fail hours later. After the folds job the leakage checks run
(:func:`rsna19.pipeline.layout.check_no_leakage`). Each stage prints one line when its last job ends; the run
ends with the score table (per base model and stacked, OOF and test) and the time of each stage, also written to
``WORK/pipeline_summary.json``.

Jobs run on this machine (:mod:`rsna19.pipeline.executor`: ``jobs`` model jobs at a time, each on its own GPUs) or
as SLURM batch jobs (:mod:`rsna19.pipeline.slurm`, ``executor="slurm"``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rsna19.core.atomic import write_text
from rsna19.core.config import save_config
from rsna19.core.errors import UserError
from rsna19.inference.submission import score_submission
from rsna19.pipeline.config import PipelineConfig
from rsna19.pipeline.executor import JobEvent, gpu_slots, run_graph
from rsna19.pipeline.slurm import run_slurm
from rsna19.pipeline.stages import STAGES, Job, StackJob, plan
from rsna19.stacking.run import DONE_FILE, stack_dir
from rsna19.tools.doctor import run_checks

log = logging.getLogger(__name__)


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


def run_pipeline(
    data_dir: str | os.PathLike[str],
    work: str | os.PathLike[str],
    cfg: PipelineConfig,
    *,
    progress: bool = False,
    say: Callable[[str], None] = print,
    executor: str = "local",
    preflight: bool = True,
) -> PipelineResult:
    """Run every job of ``cfg`` on ``data_dir`` into ``work``, skipping what is already done.

    Args:
        data_dir: RSNA-layout folder (``stage_2_train/``, ``stage_2_train.csv``, ``stage_2_test/`` ...).
        work: output folder (created).
        cfg: the pipeline (from :func:`rsna19.pipeline.config.load_pipeline`, config paths resolved).
        progress: show the stages' own progress bars (index, convert, training batches).
        say: where the progress lines go.
        executor: ``local`` (this machine, ``jobs`` at a time) or ``slurm`` (every job a SLURM batch job).
        preflight: run ``rsna19 doctor``'s checks first and stop on a failure.

    Returns:
        The scores, timings and output paths.

    Raises:
        UserError: a data folder not in the RSNA layout, a failed preflight check, leakage between folds or splits,
            or any stage's error.
    """
    if executor not in ("local", "slurm"):
        raise UserError(f"--executor must be local or slurm, got {executor!r}")
    jobs = plan(data_dir, work, cfg, progress)
    ctx = jobs[0].ctx
    paths, layout = ctx.paths, ctx.layout
    if preflight:
        # Submitting to SLURM from a login node: the GPUs are the compute nodes', not this machine's.
        run_preflight(cfg, paths.work, layout.root, say, skip=("gpu", "driver") if executor == "slurm" else ())
    paths.work.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.resolved)
    tracker = StageTracker(jobs, say)
    if executor == "slurm":
        t0 = time.perf_counter()
        run_slurm(jobs, paths.work, cfg.slurm.options(), say=say)
        tracker.timings = {s: 0.0 for s in STAGES}
        tracker.timings["train"] = time.perf_counter() - t0  # the cluster's wall time, all stages together
        tracker.skipped = {s: False for s in STAGES}
    else:
        n_gpus = _visible_gpus() if ctx.on_gpu else 0
        slots = gpu_slots(max(cfg.jobs, 1), cfg.gpus_per_job, n_gpus)
        run_graph(jobs, cfg.jobs, cfg.threads_per_job, slots, tracker.event)

    stack = next(j for j in jobs if isinstance(j, StackJob))

    scores = pd.read_csv(stack_dir(stack.config()) / DONE_FILE)
    sub_scores = score_submission(paths.submission, layout.test_labels) if layout.test_labels else None
    if sub_scores is not None:
        say(f"      submission test wll {sub_scores['wll']:.4f} on {int(sub_scores['n_slices'])} labelled slices")
    timings = {s: tracker.timings.get(s, 0.0) for s in STAGES}
    skipped = {s: tracker.skipped.get(s, True) for s in STAGES}
    out = PipelineResult(paths.work, scores, timings, skipped, paths.submission, sub_scores)
    write_text(json.dumps(summary_dict(cfg, out), indent=2) + "\n", paths.summary)
    return out


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_preflight(
    cfg: PipelineConfig, work: Path, data: Path, say: Callable[[str], None], skip: tuple[str, ...] = ()
) -> None:
    """``rsna19 doctor``'s checks for this pipeline; stops the run before any stage when one fails.

    Raises:
        UserError: a failed check (the message says what to do).
    """
    report = run_checks(cfg, work, data)
    failed = [c for c in report.checks if c.status == "fail" and c.name not in skip]
    if failed:
        raise UserError("preflight (rsna19 doctor) failed: " + "; ".join(f"{c.name}: {c.message}" for c in failed))


class StageTracker:
    """Collects job events into one line and one time per stage (printed when a stage's last job ends)."""

    def __init__(self, jobs: list[Job], say: Callable[[str], None]) -> None:
        self.say = say
        self.jobs = {j.key: j for j in jobs}
        self.left = {s: {j.key for j in jobs if j.stage == s} for s in STAGES}
        self.events: dict[str, list[tuple[JobEvent, float]]] = {s: [] for s in STAGES}
        self.timings: dict[str, float] = {}
        self.skipped: dict[str, bool] = {}
        for s in STAGES:
            if not self.left[s]:
                self._close(s)

    def event(self, ev: JobEvent) -> None:
        job = self.jobs[ev.key]
        self.events[job.stage].append((ev, time.perf_counter()))
        if job.pooled and ev.state == "ran":
            self.say(f"      {job.stage} {job.model} fold {job.fold}: {ev.seconds:.1f} s, {ev.message}")
        self.left[job.stage].discard(ev.key)
        if not self.left[job.stage]:
            self._close(job.stage)

    def _close(self, stage: str) -> None:
        evs = self.events[stage]
        ran = [e for e, _ in evs if e.state == "ran"]
        seconds = max((t for _, t in evs), default=0.0) - min((t - e.seconds for e, t in evs), default=0.0)
        self.timings[stage] = seconds if ran else 0.0
        self.skipped[stage] = not ran
        jobs = [self.jobs[e.key] for e, _ in evs]
        if not jobs:
            message = "nothing to do"
        elif jobs[0].pooled:
            what = {"train": "trained", "embed": "embedded", "predict": "predicted"}[stage]
            message = f"{len(jobs)} model × fold jobs, {len(ran)} {what}, {len(jobs) - len(ran)} already done"
        else:
            message = ran[-1].message if ran else jobs[-1].summary()  # a split stack: its final job's
        state = "skipped" if not ran else f"{seconds:7.1f} s"
        self.say(f"[{STAGES.index(stage) + 1}/{len(STAGES)}] {stage:<8} {state:>10}  {message}")


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
    """The final table: per-model and stacked weighted log loss (OOF and test), the AUC of ``any`` per slice and
    per study, the blend against the best base model, then the time of each stage."""
    import math

    def cell(r: Any, key: str) -> str:
        v = r.get(key)
        return "" if v is None or math.isnan(float(v)) else f"{float(v):.4f}"

    lines = [
        "",
        "weighted log loss (lower is better; OOF = out-of-fold on train, test = held-out test labels) and AUC of "
        "`any` per slice and per study (a study scores its highest slice)",
    ]
    keys = ("wll_oof", "wll_test", "auc_any", "auc_any_test", "study_auc_oof", "study_auc_test")
    rows = [("model", "kind", "OOF", "test", "AUC OOF", "AUC test", "study OOF", "study test")]
    for _, r in result.scores.iterrows():
        rows.append((str(r["name"]), str(r["kind"]), *(cell(r, k) for k in keys)))
    if result.submission_scores is not None:
        rows.append(("submission.csv", "scored", "", f"{result.submission_scores['wll']:.4f}", "", "", "", ""))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        lines.append("  " + "  ".join(v.ljust(w[j]) if j < 2 else v.rjust(w[j]) for j, v in enumerate(r)).rstrip())
        if i == 0:
            lines.append("  " + "  ".join("-" * x for x in w))
    lines += versus_best_base(result.scores)
    lines += ["", "time per stage"]
    for s, seconds in result.timings.items():
        flag = " (skipped: already done)" if result.skipped.get(s) else ""
        lines.append(f"  {s:<8} {seconds:8.1f} s{flag}")
    lines.append(f"  {'total':<8} {sum(result.timings.values()):8.1f} s")
    return "\n".join(lines)


def versus_best_base(scores: pd.DataFrame) -> list[str]:
    """One line comparing the blend with the best base model on OOF and, separately, with the best on test."""
    base = scores[scores["kind"] == "base"]
    blend = scores[scores["kind"] == "blend"]
    if base.empty or blend.empty:
        return []
    s = blend.iloc[0]
    parts = []
    for col, label in (("wll_oof", "OOF"), ("wll_test", "test")):
        vals = base[col].dropna()
        if vals.empty or pd.isna(s[col]):
            continue
        best = base.loc[vals.idxmin()]
        parts.append(f"{label} {s[col] / best[col]:.3f} × {best['name']}")
    if not parts:
        return []
    lines = ["", "  blend / best base model: " + ", ".join(parts) + " (below 1: the second level helps)"]
    best_oof = base.loc[base["wll_oof"].idxmin()] if base["wll_oof"].notna().any() else None
    if best_oof is not None and s["wll_oof"] == best_oof["wll_oof"]:
        lines.append(
            f"  (the blend is {best_oof['name']}: stacking did not beat it on the level-2 OOF rows, blend.fallback)"
        )
    return lines


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
