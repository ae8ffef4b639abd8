"""How many threads a job may use: the CPUs it was given, never a number written into a config.

A config says ``num_threads: auto`` (the default) and :func:`resolve_threads` answers, in this order:

1. ``RSNA19_THREADS``: set by whoever runs the job with a share of the machine: the local executor
   (:mod:`rsna19.pipeline.executor`: the job's ``Resources.cpus``, the pipeline's ``threads_per_job`` in a pooled
   worker), the SLURM batch scripts (the allocation), and the lines ``rsna19 run --print-jobs`` prints;
2. ``SLURM_CPUS_PER_TASK``: the job's allocation when it runs under SLURM without the variable above;
3. the CPUs this process may run on (``os.sched_getaffinity``, which honours cgroup cpusets and ``taskset``).

A number in the config still wins (``lgbm.num_threads=4`` on the command line), for a measurement.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from rsna19.core.errors import UserError

#: The environment variable that carries a job's thread budget.
THREADS_ENV = "RSNA19_THREADS"


def machine_cpus() -> int:
    """CPUs this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _positive_int(value: str, where: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise UserError(f"{where}={value!r} is not a number of threads") from None
    if n < 1:
        raise UserError(f"{where}={value!r}: a number of threads is at least 1")
    return n


def allocated_threads(environ: dict[str, str] | None = None) -> int:
    """The job's thread budget: ``RSNA19_THREADS``, else ``SLURM_CPUS_PER_TASK``, else :func:`machine_cpus`.

    Raises:
        UserError: one of the variables is set but is not a positive integer.
    """
    env = os.environ if environ is None else environ
    for name in (THREADS_ENV, "SLURM_CPUS_PER_TASK"):
        value = env.get(name, "").strip()
        if value:
            return _positive_int(value, name)
    return machine_cpus()


def resolve_threads(value: int | str, where: str = "num_threads") -> int:
    """A config's ``num_threads``: a positive number as it is, ``auto`` as :func:`allocated_threads`.

    Raises:
        UserError: anything else.
    """
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return allocated_threads()
        return _positive_int(value, where)
    if isinstance(value, bool) or int(value) < 1:
        raise UserError(f"{where}: expected auto or a positive number, got {value!r}")
    return int(value)


@contextlib.contextmanager
def thread_budget(n: int | None) -> Iterator[None]:
    """Set ``RSNA19_THREADS`` to ``n`` for the duration (None: leave it as it is)."""
    if n is None:
        yield
        return
    old = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(int(n))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = old
