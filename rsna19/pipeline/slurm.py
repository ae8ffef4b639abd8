"""``rsna19 run --executor slurm``: every pipeline job as one SLURM batch job, chained with ``afterok``.

:func:`run_slurm` takes the pipeline's jobs (``plan(...)``, topological order) and

1. asks each job whether it is done; done jobs are skipped (resume), the others get a batch script
   ``WORK/slurm/<key>.sh`` (``set -e``, one shlex-quoted line per argv of ``job.commands()``) and are submitted with
   ``sbatch --parsable --kill-on-invalid-dep=yes --dependency=afterok:<ids>`` on the dependencies submitted in the
   same call, the job's resources (``--cpus-per-task``, ``--mem``, ``--time``, ``--gres=gpu:N`` only when N > 0,
   ``--partition``), ``--job-name rsna19:<key>`` and its log at ``WORK/slurm/<key>.out`` (``/`` → ``__``);
2. records the job ids in ``WORK/slurm/jobs.json`` (updated as states change);
3. polls ``squeue`` (``sacct`` for jobs ``squeue`` no longer knows) every ``poll_s`` seconds until everything ended.
   A failed job is reported at once with its key, state and the tail of its log; the jobs that depend on it
   (directly or not) are cancelled with ``scancel``; the other branches run to their end, then
   :class:`SlurmJobError` names every failure. A job left pending for a reason that means it can never start as
   submitted (``PartitionConfig``: more CPUs, memory or time than the partition's nodes have; a bad account or
   QOS) is cancelled and reported the same way after ``unschedulable_s``. Ctrl-C cancels what this call submitted.

Resume: a second call submits only what is not done. Jobs still queued or running from an earlier call (found
through ``jobs.json`` and ``squeue``) are adopted, not submitted twice. A job that is done but depends on a job
being re-run is decided when that dependency finishes (its ``done()`` may compare file times with the dependency's
outputs, as the local run does), then skipped or submitted; with ``wait=False`` there is no one to decide later,
so such a job is submitted again.

Why subprocess calls and not a client library: submitit (MIT) is the closest fit, but its unit is a pickled Python
callable run by ``python -m submitit.core._submit`` under ``srun`` in a folder of pickles; plain argv lists need
its ``CommandFunction`` wrapper, dependencies go in as raw ``additional_parameters``, and its status watcher reads
``sacct``, which needs SLURM accounting (clusters without slurmdbd, like the single-node test cluster, have none).
Four commands with machine-readable output (``sbatch --parsable``, ``squeue --format``, ``sacct --parsable2``,
``scancel``) do the same with no new dependency, a batch script a person can read and resubmit, and ``squeue`` as
the source of truth.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rsna19.core.atomic import write_text
from rsna19.core.errors import UserError

#: SLURM job states after which a job will not run again; only ``COMPLETED`` is a success.
FAILED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)
COMPLETED = "COMPLETED"
#: Pending reasons of a job that cannot start as submitted (more than the partition's nodes or limits allow, a
#: bad account or QOS): after ``SlurmOptions.unschedulable_s`` in one of them the job is cancelled as failed.
UNSCHEDULABLE_REASONS = frozenset(
    {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount", "InvalidQOS"}
)
#: Pending reasons not worth a line (waiting for its turn, for resources, for its dependencies).
_ROUTINE_REASONS = frozenset({"", "None", "(null)", "Priority", "Resources", "Dependency", "BeginTime"})
#: Job kinds of :class:`SlurmSection` (the first part of a job key; anything else is ``data``).
KINDS: tuple[str, ...] = ("train", "predict", "embed", "stack", "data")
_KIND_OF_PREFIX = {"train": "train", "predict": "predict", "embed": "embed", "stack": "stack", "submit": "stack"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Resources:
    """What one job asks of a machine or a scheduler (``Job.resources`` of :mod:`rsna19.pipeline.stages`).

    Attributes:
        gpus: GPUs (0: CPU only).
        cpus: CPU cores (torch threads + loader workers).
        mem_gb: memory.
        time_min: wall-time limit for a scheduler.
        partition: scheduler partition (None: its default).
    """

    gpus: int = 0
    cpus: int = 1
    mem_gb: float = 4.0
    time_min: int = 60
    partition: str | None = None


#: What one batch job asks for: ``Job.resources`` with the section's kind settings and overrides applied.
JobRequest = Resources


class JobLike(Protocol):
    """What :func:`run_slurm` uses of a pipeline job (``rsna19.pipeline.stages.Job``)."""

    key: str
    deps: tuple[str, ...]
    resources: Resources

    def done(self) -> bool: ...

    def commands(self) -> list[list[str]]: ...


@dataclass
class SlurmResources:
    """What the ``slurm:`` section changes in the resources of one job kind; None keeps the job's own value.

    The jobs' own resources (``Job.resources``, from the pipeline: ``gpus_per_job``, ``threads_per_job``,
    ``device``) are what a local run uses; on a cluster one usually wants more CPUs (loader workers), memory and
    a time limit, e.g. ``slurm: {train: {cpus: 8, mem_gb: 48, time_min: 2880}}``.

    Attributes:
        gpus: GPUs (``--gres=gpu:N``; none asked for when 0).
        cpus: ``--cpus-per-task`` (also the job's ``OMP_NUM_THREADS`` and ``RSNA19_THREADS``: the threads of the
            stackers' ``num_threads: auto``).
        mem_gb: ``--mem`` in GB (rounded up to whole MB).
        time_min: ``--time`` in minutes.
        partition: ``--partition`` of this kind (else the job's, else the section's).
    """

    gpus: int | None = None
    cpus: int | None = None
    mem_gb: float | None = None
    time_min: int | None = None
    partition: str | None = None

    def fields(self) -> dict[str, Any]:
        """The fields that are set (not None)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def kind_of(key: str) -> str:
    """The job kind of a job key (its first ``/`` part when that is a kind; ``submit`` counts as ``stack``)."""
    return _KIND_OF_PREFIX.get(key.split("/", 1)[0], "data")


@dataclass
class SlurmSection:
    """The ``slurm:`` section of a pipeline config: where and with what ``rsna19 run --executor slurm`` submits.

    Attributes:
        partition: default ``--partition`` (None: the cluster's default).
        account: ``--account`` (None: the user's default).
        extra_args: more ``sbatch`` arguments for every job, e.g. ``["--qos=high", "--constraint=a100"]``.
        poll_s: seconds between two ``squeue`` polls while waiting.
        setup: shell lines each batch script runs before its commands (``module load cuda``, ``source venv``).
        env: environment variables exported in each batch script.
        train, predict, embed, stack, data: resource changes per job kind (``data``: index, convert, folds;
            ``stack``: stack and submit); unset fields keep the job's own resources.
    """

    partition: str | None = None
    account: str | None = None
    extra_args: list[str] = field(default_factory=list)
    poll_s: float = 30.0
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    train: SlurmResources = field(default_factory=SlurmResources)
    predict: SlurmResources = field(default_factory=SlurmResources)
    embed: SlurmResources = field(default_factory=SlurmResources)
    stack: SlurmResources = field(default_factory=SlurmResources)
    data: SlurmResources = field(default_factory=SlurmResources)

    def options(self, **overrides: Any) -> SlurmOptions:
        """The :class:`SlurmOptions` of this section, with ``overrides`` (e.g. ``wait=False``)."""
        base = {
            "partition": self.partition,
            "account": self.account,
            "extra_args": list(self.extra_args),
            "poll_s": self.poll_s,
            "setup": list(self.setup),
            "env": dict(self.env),
            "kind_resources": {k: getattr(self, k).fields() for k in KINDS if getattr(self, k).fields()},
        }
        return SlurmOptions(**{**base, **overrides})


@dataclass
class SlurmOptions:
    """How :func:`run_slurm` submits and waits.

    Attributes:
        partition: ``--partition`` of jobs whose resources name none (None: the cluster's default).
        account: ``--account`` (None: the user's default).
        extra_args: more ``sbatch`` arguments for every job.
        poll_s: seconds between two ``squeue`` polls.
        rsna19: the executable that replaces a command's leading ``rsna19`` in the batch scripts. None: the
            ``rsna19`` next to this Python (the same virtual environment), else the one on ``PATH``. The
            compute nodes must see it at the same path.
        env: environment variables exported in each batch script (the submitting shell's environment is
            exported too, sbatch's default).
        setup: shell lines each batch script runs before its commands.
        wait: wait for the jobs (and decide the deferred ones); False returns once everything is submitted.
        log_tail: lines of a failed job's log shown in the report.
        kind_resources: job kind (:data:`KINDS`) → fields of ``Job.resources`` replaced for the jobs of that kind.
        resource_override: fields of ``Job.resources`` replaced for every job (after ``kind_resources``), e.g.
            ``{"gpus": 0, "mem_gb": 2}``.
        cancel_on_interrupt: Ctrl-C while waiting cancels the jobs this call submitted.
        unschedulable_s: seconds a job may stay pending for a reason in :data:`UNSCHEDULABLE_REASONS` before it
            is cancelled and reported as failed (other unusual pending reasons are only reported).
    """

    partition: str | None = None
    account: str | None = None
    extra_args: list[str] = field(default_factory=list)
    poll_s: float = 30.0
    rsna19: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)
    wait: bool = True
    log_tail: int = 40
    kind_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    resource_override: dict[str, Any] = field(default_factory=dict)
    cancel_on_interrupt: bool = True
    unschedulable_s: float = 120.0


class SlurmJobError(UserError):
    """Some SLURM jobs failed (their dependents were cancelled).

    Attributes:
        failed: job key → what went wrong (state, job id, log path and log tail).
        cancelled: keys of the jobs cancelled or never submitted because something they need failed.
    """

    def __init__(self, message: str, failed: dict[str, str], cancelled: list[str]):
        super().__init__(message)
        self.failed = failed
        self.cancelled = cancelled


def log_stem(key: str) -> str:
    """The file name stem of job ``key`` under ``WORK/slurm/``: ``/`` → ``__``, other odd characters → ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", key.replace("/", "__"))


def slurm_dir(work: str | os.PathLike[str]) -> Path:
    """``WORK/slurm``: batch scripts, logs and ``jobs.json``."""
    return Path(work) / "slurm"


def default_rsna19() -> str:
    """The ``rsna19`` executable of this environment: next to ``sys.executable``, else on ``PATH``.

    Raises:
        UserError: neither exists.
    """
    here = Path(sys.executable).parent / "rsna19"
    if here.is_file():
        return str(here)
    found = shutil.which("rsna19")
    if found:
        return found
    raise UserError(f"no rsna19 executable next to {sys.executable} or on PATH: set SlurmOptions.rsna19")


def job_resources(job: JobLike, options: SlurmOptions) -> JobRequest:
    """The job's resources with ``options.kind_resources[kind]`` and then ``options.resource_override`` applied.

    Raises:
        UserError: an unknown kind or field name.
    """
    r = job.resources
    req = JobRequest(int(r.gpus), int(r.cpus), float(r.mem_gb), int(r.time_min), r.partition)
    names = {f.name for f in dataclasses.fields(JobRequest)}
    unknown_kinds = set(options.kind_resources) - set(KINDS)
    if unknown_kinds:
        raise UserError(f"slurm kind_resources: unknown kind(s) {sorted(unknown_kinds)}; kinds: {', '.join(KINDS)}")
    for what, changes in (
        ("slurm." + kind_of(job.key), options.kind_resources.get(kind_of(job.key), {})),
        ("resource_override", options.resource_override),
    ):
        unknown = set(changes) - names
        if unknown:
            raise UserError(f"{what}: unknown field(s) {sorted(unknown)}; fields: {', '.join(sorted(names))}")
        req = dataclasses.replace(req, **changes)
    return req


def sbatch_args(job: JobLike, work: Path, options: SlurmOptions) -> list[str]:
    """The ``sbatch`` options of ``job`` (no dependency, no script), ``options.extra_args`` last."""
    res = job_resources(job, options)
    log = slurm_dir(work).resolve() / f"{log_stem(job.key)}.out"
    args = [
        f"--job-name=rsna19:{job.key}",
        f"--output={log}",
        f"--chdir={Path.cwd()}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={max(1, res.cpus)}",
        f"--mem={max(1, math.ceil(res.mem_gb * 1024))}M",
        f"--time={max(1, res.time_min)}",
    ]
    if res.gpus > 0:
        args.append(f"--gres=gpu:{res.gpus}")
    partition = res.partition or options.partition
    if partition:
        args.append(f"--partition={partition}")
    if options.account:
        args.append(f"--account={options.account}")
    return [*args, *options.extra_args]


def batch_script(
    job: JobLike,
    options: SlurmOptions,
    rsna19: Callable[[], str] = default_rsna19,
    args: Sequence[str] = (),
) -> str:
    """The batch script of ``job``: ``set -e``, the exports and setup lines, then one line per command.

    Args:
        job: the job.
        options: env and setup lines.
        rsna19: gives the executable that replaces a leading ``rsna19`` (called only when a command has one).
        args: its sbatch options, written in a comment (``sbatch ARGS SCRIPT`` resubmits it by hand).

    Raises:
        UserError: an env name that is not a shell variable name, or a job without commands.
    """
    commands = job.commands()
    if not commands or any(not argv for argv in commands):
        raise UserError(f"job {job.key}: no command to run (empty commands())")
    lines = [
        "#!/bin/bash",
        f"# rsna19 pipeline job {job.key}, written by rsna19.pipeline.slurm; submitted (dependencies aside) with",
        f"#   sbatch {shlex.join(args)} THIS_SCRIPT",
        "set -e",
        "export PYTHONUNBUFFERED=1",
    ]
    if "OMP_NUM_THREADS" not in options.env:
        lines.append('export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"')
    if "RSNA19_THREADS" not in options.env:  # `num_threads: auto` uses the allocation (rsna19.core.threads)
        lines.append('export RSNA19_THREADS="${SLURM_CPUS_PER_TASK:-1}"')
    for name, value in options.env.items():
        if not _ENV_NAME.fullmatch(name):
            raise UserError(f"slurm env: {name!r} is not a valid environment variable name")
        lines.append(f"export {name}={shlex.quote(str(value))}")
    lines += list(options.setup)
    lines.append(f'echo "[rsna19] {job.key}: slurm job ${{SLURM_JOB_ID:-?}} on $(hostname) at $(date -Is)"')
    exe: str | None = None
    for argv in commands:
        argv = [str(a) for a in argv]
        if argv[0] == "rsna19":
            exe = exe or rsna19()
            argv = [exe, *argv[1:]]
        lines.append(shlex.join(argv))
    lines.append(f'echo "[rsna19] {job.key}: finished at $(date -Is)"')
    return "\n".join(lines) + "\n"


def log_tail(path: Path, n: int) -> str:
    """The last ``n`` lines of a log, or a note that it is missing."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(lines[-n:]) if lines else f"(empty log {path})"


def _now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError as exc:
        raise UserError(f"{cmd[0]} not found: is this a SLURM login node (sbatch, squeue, scancel on PATH)?") from exc
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]} timed out: {exc}")


def sbatch(args: Sequence[str], script: Path, after: Sequence[str] = ()) -> str:
    """Submit ``script``; returns the job id.

    Raises:
        UserError: sbatch failed (its message included).
    """
    cmd = ["sbatch", "--parsable", "--kill-on-invalid-dep=yes"]
    if after:
        cmd.append("--dependency=afterok:" + ":".join(after))
    proc = _run([*cmd, *args, str(script)])
    out = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not out or not out[-1].split(";")[0].strip().isdigit():
        raise UserError(f"sbatch {script} failed: {(proc.stderr or proc.stdout).strip()}")
    return out[-1].split(";")[0].strip()


def squeue(ids: Sequence[str]) -> dict[str, tuple[str, str, str]] | None:
    """Job id → (state, reason, name) of the jobs ``squeue`` knows (finished ones too, for ``MinJobAge``).

    Returns:
        None when ``squeue`` itself failed (controller busy or down).
    """
    if not ids:
        return {}
    proc = _run(["squeue", "--noheader", "--states=all", f"--jobs={','.join(ids)}", "--format=%i|%T|%r|%j"])
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return {}  # every id is gone from the controller's memory
        return None
    out: dict[str, tuple[str, str, str]] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4:
            out[parts[0]] = (parts[1].split()[0] if parts[1] else "", parts[2], parts[3])
    return out


def sacct(ids: Sequence[str]) -> dict[str, str]:
    """Job id → final state from the accounting database; empty where SLURM has no accounting."""
    if not ids:
        return {}
    proc = _run(["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={','.join(ids)}", "-o", "JobID,State"])
    if proc.returncode != 0:
        return {}
    out: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[1]:
            out[parts[0]] = parts[1].split()[0]
    return out


def scancel(ids: Sequence[str]) -> None:
    """Cancel jobs (errors ignored: a job may have ended meanwhile)."""
    if ids:
        _run(["scancel", *ids])


@dataclass
class _Entry:
    job: JobLike
    was_done: bool
    state: str = "done"  # done | submitted | deferred | completed | failed | cancelled
    job_id: str | None = None
    slurm_state: str = ""
    adopted: bool = False
    note: str = ""
    unseen: int = 0
    reason: str = ""
    stuck_since: float | None = None
    args: list[str] = field(default_factory=list)


class _Run:
    """One :func:`run_slurm` call: the entries, submission, polling and reporting."""

    def __init__(self, jobs: Sequence[JobLike], work: Path, options: SlurmOptions, say: Callable[[str], None]):
        self.work, self.options, self.say = work, options, say
        self.dir = slurm_dir(work)
        self.keys = [j.key for j in jobs]
        self.by_key: dict[str, _Entry] = {}
        self.dependents: dict[str, list[str]] = {k: [] for k in self.keys}
        self.failures: dict[str, str] = {}
        self.squeue_errors = 0
        self.previous: dict[str, str] = {}
        self.t0 = time.monotonic()
        self._exe: str | None = None
        seen: set[str] = set()
        stems: dict[str, str] = {}
        for job in jobs:
            if job.key in seen:
                raise UserError(f"slurm: job key {job.key!r} appears twice")
            if not job.key or any(c.isspace() for c in job.key):
                raise UserError(f"slurm: job key {job.key!r} is empty or has white space")
            stem = log_stem(job.key)
            if stem in stems:
                raise UserError(f"slurm: job keys {stems[stem]!r} and {job.key!r} share the log name {stem}")
            stems[stem] = job.key
            for d in job.deps:
                if d not in seen:
                    where = "comes after it" if d in self.keys else "is not among the jobs"
                    raise UserError(f"slurm: job {job.key} depends on {d!r}, which {where} (need topological order)")
                self.dependents[d].append(job.key)
            seen.add(job.key)
        self.jobs = list(jobs)

    # ---- paths and records
    def log(self, key: str) -> Path:
        return self.dir / f"{log_stem(key)}.out"

    def script(self, key: str) -> Path:
        return self.dir / f"{log_stem(key)}.sh"

    def rsna19(self) -> str:
        if self._exe is None:
            self._exe = self.options.rsna19 or default_rsna19()
        return self._exe

    def previous_ids(self) -> dict[str, str]:
        try:
            data = json.loads((self.dir / "jobs.json").read_text())
            jobs = data.get("jobs", {}).items()
            return {k: str(i) for k, v in jobs if (i := v.get("job_id") or v.get("previous_job_id"))}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            return {}

    def record(self) -> None:
        jobs = {}
        previous = self.previous
        for key in self.keys:
            e = self.by_key.get(key)
            if e is None:
                continue
            jobs[key] = {
                "job_id": e.job_id,
                "previous_job_id": None if e.job_id else previous.get(key),
                "state": e.slurm_state or e.state,
                "deps": list(e.job.deps),
                "log": str(self.log(key)) if e.job_id else None,
                "script": str(self.script(key)) if e.job_id else None,
                "sbatch_args": e.args or None,
                "adopted": e.adopted,
                "note": e.note or None,
            }
        write_text(
            json.dumps({"work": str(self.work), "updated": _now(), "jobs": jobs}, indent=2) + "\n",
            self.dir / "jobs.json",
        )

    def elapsed(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"

    # ---- submission
    def submit(self, e: _Entry) -> None:
        key = e.job.key
        after = [self.by_key[d].job_id for d in e.job.deps if self.by_key[d].state == "submitted"]
        e.args = sbatch_args(e.job, self.work, self.options)
        write_text(batch_script(e.job, self.options, self.rsna19, e.args), self.script(key))
        self.log(key).unlink(missing_ok=True)
        e.job_id = sbatch(e.args, self.script(key), [a for a in after if a])
        e.state, e.slurm_state = "submitted", "PENDING"
        deps = f" after {', '.join(after)}" if after else ""
        self.say(f"[slurm] {key}: submitted as job {e.job_id}{deps}")

    def initial_pass(self) -> None:
        previous = self.previous = self.previous_ids()
        live = squeue(sorted(set(previous.values()))) if previous else {}
        live = live or {}
        for job in self.jobs:
            deps = [self.by_key[d] for d in job.deps]
            e = _Entry(job, was_done=bool(job.done()))
            self.by_key[job.key] = e
            upstream = any(d.state in ("submitted", "deferred") for d in deps)
            old = previous.get(job.key)
            old_info = live.get(old) if old else None
            old_active = (
                old_info is not None
                and old_info[0] not in FAILED_STATES
                and old_info[0] != COMPLETED
                and old_info[2] == f"rsna19:{job.key}"
            )
            if e.was_done and not upstream:
                e.state = "done"
                continue
            if any(d.state == "deferred" for d in deps) or (e.was_done and self.options.wait):
                e.state = "deferred"
                continue
            adoptable = all(d.state == "done" or (d.state == "submitted" and d.adopted) for d in deps)
            if old_active and adoptable and old_info is not None and old_info[1] != "DependencyNeverSatisfied":
                e.state, e.job_id, e.adopted, e.slurm_state = "submitted", old, True, old_info[0]
                self.say(f"[slurm] {job.key}: already {old_info[0].lower()} as job {old} (from an earlier call)")
                continue
            if old_active and old:
                scancel([old])  # an earlier copy waits on jobs that are submitted again now
            self.submit(e)

    # ---- waiting
    def cancel_dependents(self, key: str, why: str) -> None:
        stack = list(self.dependents[key])
        while stack:
            k = stack.pop()
            e = self.by_key[k]
            if e.state in ("submitted", "deferred"):
                if e.state == "submitted" and e.job_id:
                    scancel([e.job_id])
                e.state, e.note = "cancelled", why
                e.slurm_state = "CANCELLED" if e.job_id else "NOT_SUBMITTED"
                self.say(f"[slurm] {k}: cancelled ({why})")
            stack.extend(self.dependents[k])

    def fail(self, e: _Entry, state: str) -> None:
        key = e.job.key
        upstream_failed = [d for d in e.job.deps if self.by_key[d].state in ("failed", "cancelled")]
        if state == "CANCELLED" and upstream_failed:
            e.state, e.note = "cancelled", f"{upstream_failed[0]} failed"
            return
        e.state = "failed"
        if e.note:
            msg = f"{key}: SLURM job {e.job_id} {e.note}"
        else:
            tail = log_tail(self.log(key), self.options.log_tail)
            msg = f"{key}: SLURM job {e.job_id} ended {state}; log {self.log(key)}:\n{tail}"
        self.failures[key] = msg
        self.say(f"[slurm] FAILED {msg}")
        self.cancel_dependents(key, f"{key} failed")

    def poll(self) -> bool:
        """Update the submitted jobs' states; True when something changed."""
        active = [e for k in self.keys if (e := self.by_key[k]).state == "submitted" and e.job_id]
        if not active:
            return False
        info = squeue([e.job_id for e in active if e.job_id])
        if info is None:
            self.squeue_errors += 1
            if self.squeue_errors >= 10:
                raise UserError("squeue failed 10 times in a row: is the SLURM controller up?")
            return False
        self.squeue_errors = 0
        missing = [e.job_id for e in active if e.job_id not in info]
        final = sacct([m for m in missing if m])
        changed = False
        for e in active:  # topological order: upstream failures are classified first
            if e.state != "submitted":
                continue
            key = e.job.key
            if e.job_id in info:
                state, reason, _ = info[e.job_id]
            elif e.job_id in final:
                state, reason = final[e.job_id], ""
            else:
                e.unseen += 1
                if e.unseen < 2:
                    continue
                # Gone from squeue and no accounting: the job's own outputs decide.
                state, reason = (COMPLETED if e.job.done() else "UNKNOWN_FAILED"), ""
            if state == "PENDING" and reason == "DependencyNeverSatisfied":
                scancel([e.job_id] if e.job_id else [])
                state = "CANCELLED"
            elif state == "PENDING":
                state = self.check_pending(e, reason)
            if state == e.slurm_state:
                continue
            e.slurm_state = state
            changed = True
            if state == COMPLETED:
                e.state = "completed"
                self.say(f"[slurm] {key}: completed (job {e.job_id}, {self.elapsed()} since start)")
                if not e.job.done():
                    self.say(f"[slurm] warning: {key} completed but its outputs do not look complete (done() False)")
            elif state in FAILED_STATES or state in ("UNKNOWN_FAILED", "UNSCHEDULABLE"):
                self.fail(e, state)
            elif state == "RUNNING":
                self.say(f"[slurm] {key}: running (job {e.job_id})")
        return changed

    def check_pending(self, e: _Entry, reason: str) -> str:
        """Report an unusual pending reason once; ``UNSCHEDULABLE`` (job cancelled) when one lasts too long."""
        if reason != e.reason:
            e.reason = reason
            e.stuck_since = time.monotonic() if reason in UNSCHEDULABLE_REASONS else None
            if reason not in _ROUTINE_REASONS:
                self.say(f"[slurm] {e.job.key}: pending, reason {reason} (job {e.job_id})")
        if e.stuck_since is not None and time.monotonic() - e.stuck_since >= self.options.unschedulable_s:
            scancel([e.job_id] if e.job_id else [])
            e.note = (
                f"pending with reason {reason} for {self.options.unschedulable_s:.0f} s, so cancelled: it asks for "
                f"more than the cluster allows ({' '.join(e.args)}); change the pipeline's slurm section"
            )
            return "UNSCHEDULABLE"
        return "PENDING"

    def resolve_deferred(self) -> bool:
        """Submit, skip or cancel the deferred jobs whose dependencies allow a decision; True when one changed."""
        changed = False
        for key in self.keys:
            e = self.by_key[key]
            if e.state != "deferred":
                continue
            deps = [self.by_key[d] for d in e.job.deps]
            bad = [d.job.key for d in deps if d.state in ("failed", "cancelled")]
            if bad:
                e.state, e.slurm_state, e.note = "cancelled", "NOT_SUBMITTED", f"{bad[0]} failed"
                self.say(f"[slurm] {key}: not submitted ({bad[0]} failed)")
                changed = True
            elif e.was_done:
                if all(d.state in ("done", "completed") for d in deps):
                    changed = True
                    if e.job.done():
                        e.state = "done"
                        self.say(f"[slurm] {key}: still done after its dependencies re-ran, skipped")
                    else:
                        self.submit(e)
            elif not any(d.state == "deferred" for d in deps):
                self.submit(e)
                changed = True
        return changed

    def wait(self) -> None:
        while any(self.by_key[k].state in ("submitted", "deferred") for k in self.keys):
            changed = self.poll()
            changed = self.resolve_deferred() or changed
            if changed:
                self.record()
            else:
                time.sleep(self.options.poll_s)

    def active_ids(self) -> list[str]:
        return [e.job_id for k in self.keys if (e := self.by_key[k]).state == "submitted" and e.job_id]


def run_slurm(
    jobs: Sequence[JobLike],
    work: str | os.PathLike[str],
    options: SlurmOptions | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Run the jobs that are not done as SLURM batch jobs chained by ``afterok``, and wait for them.

    Args:
        jobs: the pipeline's jobs in topological order (every dependency before its dependents).
        work: the work folder; scripts, logs and ``jobs.json`` go to ``WORK/slurm/``.
        options: partition, account, extra sbatch arguments, executable, environment, polling.
        say: where progress lines go.

    Raises:
        SlurmJobError: a job failed (its dependents were cancelled, the other branches ran to their end).
        UserError: bad jobs (duplicate keys, not topological), sbatch refused a job (what this call submitted
            before it is cancelled), or squeue kept failing.
    """
    options = options or SlurmOptions()
    work = Path(work)
    run = _Run(jobs, work, options, say)
    run.dir.mkdir(parents=True, exist_ok=True)
    try:
        run.initial_pass()
    except BaseException:
        scancel([e.job_id for e in run.by_key.values() if e.state == "submitted" and not e.adopted and e.job_id])
        raise
    n = {s: sum(e.state == s for e in run.by_key.values()) for s in ("done", "submitted", "deferred")}
    run.record()
    say(
        f"[slurm] {len(run.keys)} jobs: {n['done']} done (skipped), {n['submitted']} submitted, "
        f"{n['deferred']} waiting on re-run dependencies; ids in {run.dir / 'jobs.json'}"
    )
    if not options.wait:
        return
    try:
        run.wait()
    except KeyboardInterrupt:
        ids = run.active_ids()
        if options.cancel_on_interrupt and ids:
            scancel(ids)
            say(f"[slurm] interrupted: cancelled jobs {', '.join(ids)}")
        raise
    finally:
        run.record()
    states = [e.state for e in run.by_key.values()]
    cancelled = [k for k in run.keys if run.by_key[k].state == "cancelled"]
    say(
        f"[slurm] finished in {run.elapsed()}: {states.count('completed')} completed, {states.count('done')} "
        f"skipped, {len(run.failures)} failed, {len(cancelled)} cancelled"
    )
    if run.failures:
        head = f"{len(run.failures)} SLURM job(s) failed: {', '.join(run.failures)}"
        if cancelled:
            head += f"; {len(cancelled)} dependent job(s) cancelled: {', '.join(cancelled)}"
        raise SlurmJobError(head + "\n\n" + "\n\n".join(run.failures.values()), run.failures, cancelled)
