"""The local executor: run a job graph on this machine, model jobs in parallel worker processes.

A job starts when every job it depends on has finished; it is asked whether it is :meth:`~Job.done` only then (a
prediction is stale once its model retrained), and skipped when it is. Data stages, the stack and the submission
run in this process; model jobs (train, embed, predict) and the level-2 fit jobs of a split stack run in ``n_jobs``
spawned worker processes (never forked: a forked torch with threads may deadlock) with ``threads`` torch threads
each. Every job runs with ``RSNA19_THREADS`` set to its ``resources.cpus`` (:mod:`rsna19.core.threads`), so a
``num_threads: auto`` inside it uses what it was given.

GPUs: worker slot i sees only GPUs ``i·g … i·g+g−1`` (``CUDA_VISIBLE_DEVICES`` set before torch is imported in the
worker), so ``jobs: N`` on N GPUs gives each job its own GPU and ``cuda`` inside a job means its own.

The first failure stops new jobs from starting; running ones finish, then the error is raised: what finished stays
finished, so a re-run resumes.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

from rsna19.core.errors import UserError
from rsna19.core.threads import thread_budget


class GraphJob(Protocol):
    """What the executor uses of a job (:class:`rsna19.pipeline.stages.Job`)."""

    key: str
    deps: tuple[str, ...]
    pooled: bool

    def done(self) -> bool: ...

    def run(self) -> str: ...


@dataclass(frozen=True)
class JobEvent:
    """What happened to one job: ``ran`` (with its seconds and message) or ``skipped`` (already done)."""

    key: str
    state: str
    seconds: float = 0.0
    message: str = ""


def gpu_slots(n_slots: int, gpus_per_job: int, n_gpus: int) -> list[str | None]:
    """``CUDA_VISIBLE_DEVICES`` of each worker slot (None: leave it as it is).

    Slot i gets ``gpus_per_job`` consecutive GPUs, wrapping around when there are fewer GPUs than slots × g
    (jobs then share GPUs, which the scheduler line of ``--print-jobs`` shows).

    Raises:
        UserError: a job asks for more GPUs than the machine has.
    """
    if n_gpus <= 0:
        return [None] * n_slots
    if gpus_per_job > n_gpus:
        raise UserError(f"gpus_per_job is {gpus_per_job} but this machine has {n_gpus} GPU(s)")
    return [",".join(str((i * gpus_per_job + j) % n_gpus) for j in range(gpus_per_job)) for i in range(n_slots)]


def _worker_init(slots: Any, threads: int) -> None:
    """Pool-process initialiser: take a GPU slot (before torch is imported here), set the torch threads."""
    visible = slots.get()
    if visible is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    import torch

    torch.set_num_threads(threads)


def _run_timed(job: GraphJob) -> tuple[float, str]:
    """Run ``job`` with ``RSNA19_THREADS`` and torch's intra-op threads set to its CPUs, so ``num_threads: auto``
    and the model code inside it use its share."""
    cpus = getattr(getattr(job, "resources", None), "cpus", None)
    t0 = time.perf_counter()
    with thread_budget(cpus), _torch_threads(cpus):
        message = job.run()
    return time.perf_counter() - t0, message or ""


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Torch's intra-op threads set to ``n`` for the duration (None: unchanged). A pool worker starts with its share
    (:func:`_worker_init`); a job run in this process (every job of ``jobs: 1``) would otherwise use every core,
    and two such runs side by side would oversubscribe the machine."""
    if n is None:
        yield
        return
    import torch  # here, not at the top: the executor also runs jobs that never touch torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_graph(
    jobs: Sequence[GraphJob],
    n_jobs: int = 1,
    threads: int = 1,
    gpu_visible: Sequence[str | None] | None = None,
    on_event: Callable[[JobEvent], None] | None = None,
) -> list[JobEvent]:
    """Run every job that is not done, each after its dependencies; returns what happened, in completion order.

    Args:
        jobs: the graph, dependencies before dependents.
        n_jobs: worker processes for pooled jobs (≤ 1: every job runs in this process).
        threads: torch threads of each worker.
        gpu_visible: ``CUDA_VISIBLE_DEVICES`` of each worker slot (:func:`gpu_slots`); None: inherited.
        on_event: called in this process for each job as it ends or is skipped.

    Raises:
        UserError: an unknown dependency or a cycle.
        Exception: the first job failure, once the running jobs have ended.
    """
    by_key = {j.key: j for j in jobs}
    for j in jobs:
        unknown = [d for d in j.deps if d not in by_key]
        if unknown:
            raise UserError(f"job {j.key} depends on unknown job(s) {unknown}")
    events: list[JobEvent] = []
    finished: set[str] = set()
    waiting = [j.key for j in jobs]

    def record(ev: JobEvent) -> None:
        finished.add(ev.key)
        events.append(ev)
        if on_event:
            on_event(ev)

    def ready() -> list[GraphJob]:
        return [by_key[k] for k in waiting if all(d in finished for d in by_key[k].deps)]

    pool = _pool(n_jobs, threads, gpu_visible) if n_jobs > 1 and sum(j.pooled for j in jobs) > 1 else None
    running: dict[Future, GraphJob] = {}
    error: BaseException | None = None
    try:
        while waiting or running:
            progressed = False
            for job in ready() if error is None else []:
                waiting.remove(job.key)
                progressed = True
                if job.done():
                    record(JobEvent(job.key, "skipped"))
                elif job.pooled and pool is not None:
                    running[pool.submit(_run_timed, job)] = job
                else:
                    seconds, message = _run_timed(job)
                    record(JobEvent(job.key, "ran", seconds, message))
                break  # re-evaluate readiness: an in-process job may have unblocked others
            if progressed:
                continue
            if not running:
                if error is not None or not waiting:
                    break
                raise UserError(f"jobs {waiting} can never start (a dependency cycle)")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                job = running.pop(f)
                if f.exception() is not None:
                    error = error or f.exception()
                    continue
                seconds, message = f.result()
                record(JobEvent(job.key, "ran", seconds, message))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    if error is not None:
        raise error
    return events


def _pool(n_jobs: int, threads: int, gpu_visible: Sequence[str | None] | None) -> ProcessPoolExecutor:
    """``n_jobs`` spawned workers of ``threads`` torch threads, each taking its ``CUDA_VISIBLE_DEVICES`` slot."""
    ctx = mp.get_context("spawn")
    slots = ctx.Manager().Queue()
    for s in gpu_visible or [None] * n_jobs:
        slots.put(s)
    return ProcessPoolExecutor(n_jobs, ctx, _worker_init, (slots, threads))
