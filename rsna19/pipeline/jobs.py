"""``rsna19 run ... --print-jobs``: the pipeline's job graph as shell commands, for a person or a scheduler.

One block per job of :func:`rsna19.pipeline.stages.plan` (the objects the local runner and the SLURM executor run):
a comment line with the job's key, the jobs it waits for and its resources, then its commands joined by ``&&``.
Run in the printed order, the lines reproduce ``rsna19 run``; jobs whose ``after:`` lists are satisfied may run at
the same time. Model jobs carry their GPU assignment (``CUDA_VISIBLE_DEVICES=…``): job i of a stage gets worker slot
i mod ``jobs``, the GPUs that slot has in the local runner. The stack's jobs carry their threads
(``RSNA19_THREADS=N``, also in the comment): the number their ``num_threads: auto`` uses, the same the local runner
gives them (``threads_per_job`` for a level-2 fit next to others, else the machine's cores). ``rsna19 run`` with
the same arguments afterwards skips everything the jobs did and only prints the table.
"""

from __future__ import annotations

import os
import shlex

from rsna19.core.threads import THREADS_ENV
from rsna19.pipeline.config import PipelineConfig
from rsna19.pipeline.executor import gpu_slots
from rsna19.pipeline.stages import plan


def _line(argvs: list[list[str]], env: str | None, threads: int | None = None) -> str:
    prefix = f"CUDA_VISIBLE_DEVICES={env} " if env is not None else ""
    prefix += f"{THREADS_ENV}={threads} " if threads is not None else ""
    return " && ".join(prefix + " ".join(shlex.quote(a) for a in argv) for argv in argvs)


def pipeline_jobs(
    data_dir: str | os.PathLike[str],
    work: str | os.PathLike[str],
    cfg: PipelineConfig,
    pipeline_arg: str | None = None,
    n_gpus: int | None = None,
) -> list[str]:
    """Shell lines (comments start with ``#``) that run the pipeline job by job.

    Args:
        data_dir: the RSNA-layout folder.
        work: the work folder.
        cfg: the pipeline config (paths resolved).
        pipeline_arg: how the user named the pipeline (for the closing ``rsna19 run`` line).
        n_gpus: GPUs to assign (default: ``jobs × gpus_per_job`` when the pipeline runs on GPUs, else none).
    """
    jobs = plan(data_dir, work, cfg)
    on_gpu = cfg.device != "cpu"
    if n_gpus is None:
        n_gpus = cfg.jobs * cfg.gpus_per_job if on_gpu else 0
    slots = gpu_slots(cfg.jobs, cfg.gpus_per_job, n_gpus)
    lines = [f"# {len(jobs)} jobs; `after:` lists the jobs each waits for (run them in this order, or in parallel)"]
    turn: dict[str, int] = {}
    for job in jobs:
        env = None
        if job.pooled and on_gpu and job.resources.gpus:  # a level-2 fit is pooled but needs no GPU
            i = turn.get(job.stage, 0)
            turn[job.stage] = i + 1
            env = slots[i % len(slots)]
        r = job.resources
        threads = getattr(job, "threads", None)  # the stack's jobs: what their `num_threads: auto` resolves to
        res = f"{r.cpus} cpu" + (f", {r.gpus} gpu" if r.gpus and on_gpu else "")
        res += f", {threads} threads" if threads is not None else ""
        where = f"; GPU {env}" if env is not None else ""
        lines.append(f"# job {job.key} (after: {', '.join(job.deps) or '-'}; {res}{where})")
        lines.append(_line(job.commands(), env, threads))
    lines.append("# or, equivalently, let `rsna19 run` finish (it skips what the jobs did) and print the table:")
    lines.append(
        " ".join(
            shlex.quote(str(a))
            for a in ("rsna19", "run", "--data", data_dir, "--out", work, "--pipeline", pipeline_arg or cfg.name)
        )
    )
    return lines
