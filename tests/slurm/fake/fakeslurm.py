"""A fake SLURM for the tests: ``sbatch``, ``squeue``, ``sacct``, ``scancel`` and ``sinfo`` on one machine.

The wrappers next to this file (``tests/slurm/fake/sbatch`` ...) put it on ``PATH``; ``FAKE_SLURM_DIR`` names the
folder that holds its state (one JSON file a job, ``jobs/<id>.json``, changed under one lock). ``sbatch`` really
runs the batch script: it starts a runner process in its own session that waits for the job's ``afterok``
dependencies, runs ``bash SCRIPT`` with the job's output file and ``SLURM_*`` variables, and records the end state
(COMPLETED on exit 0, else FAILED). ``scancel`` marks a job CANCELLED and kills its runner's process group.

What it models of SLURM, because ``rsna19.pipeline.slurm`` relies on it:

* ``--dependency=afterok:ID[:ID...]``; a failed dependency cancels the job with ``--kill-on-invalid-dep=yes``,
  else it stays PENDING with reason ``DependencyNeverSatisfied``; an unknown dependency id is refused by sbatch;
* ``--cpus-per-task`` above ``FAKE_SLURM_CPUS`` (default: this machine's CPUs): PENDING with reason
  ``PartitionConfig`` for ever (a job that can never start);
* ``squeue --states=all`` lists finished jobs for ``FAKE_SLURM_MIN_JOB_AGE`` seconds (SLURM's ``MinJobAge``,
  default 300), then forgets them, and fails with "Invalid job id specified" when it knows none of the ids;
* ``sacct`` answers only with ``FAKE_SLURM_ACCOUNTING=1`` (most small clusters have no accounting database).

Only the standard library: it runs under any ``python3`` (``FAKE_SLURM_PYTHON`` picks one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ACTIVE = ("PENDING", "RUNNING")
BAD_DEPENDENCY = ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
POLL_S = 0.05


def state_dir() -> Path:
    """The state folder (``FAKE_SLURM_DIR``), created on first use."""
    root = os.environ.get("FAKE_SLURM_DIR")
    if not root:
        sys.exit("fake slurm: FAKE_SLURM_DIR is not set")
    path = Path(root)
    (path / "jobs").mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def locked() -> Iterator[Path]:
    """The state folder, under its lock (every change of a job's state happens inside)."""
    root = state_dir()
    with (root / "lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield root


def load(root: Path, job_id: str) -> dict[str, Any] | None:
    path = root / "jobs" / f"{job_id}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def save(root: Path, job: dict[str, Any]) -> None:
    path = root / "jobs" / f"{job['id']}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(job))
    tmp.replace(path)


def transition(job_id: str, new: str, **fields: Any) -> bool:
    """Move an active job to state ``new``; False when it already ended (a cancel won the race)."""
    with locked() as root:
        job = load(root, job_id)
        if job is None or job["state"] not in ACTIVE:
            return False
        job.update(state=new, **fields)
        if new not in ACTIVE:
            job["end"] = time.time()
        save(root, job)
        return True


def option(args: list[str], name: str, default: str | None = None) -> str | None:
    """The value of ``--name=value`` (the last one wins)."""
    found = default
    for a in args:
        if a.startswith(f"--{name}="):
            found = a.split("=", 1)[1]
    return found


def sbatch(args: list[str]) -> int:
    """``sbatch [--options] SCRIPT``: prints the new job id (``--parsable``) and starts its runner."""
    if not args or args[-1].startswith("-"):
        print("sbatch: error: no batch script", file=sys.stderr)
        return 1
    script, opts = args[-1], args[:-1]
    dependency = option(opts, "dependency", "") or ""
    deps = [d for d in dependency.removeprefix("afterok:").split(":") if d] if dependency else []
    if dependency and not dependency.startswith("afterok:"):
        print(f"sbatch: error: the fake supports afterok dependencies only, got {dependency}", file=sys.stderr)
        return 1
    with locked() as root:
        if any(load(root, d) is None for d in deps):
            print("sbatch: error: Batch job submission failed: Job dependency problem", file=sys.stderr)
            return 1
        counter = root / "next_id"
        job_id = str(int(counter.read_text()) if counter.is_file() else 1001)
        counter.write_text(str(int(job_id) + 1))
        name = option(opts, "job-name", Path(script).name)
        job = {
            "id": job_id,
            "name": name,
            "script": str(Path(script).resolve()),
            "output": option(opts, "output", str(Path.cwd() / f"slurm-{job_id}.out")),
            "chdir": option(opts, "chdir", str(Path.cwd())),
            "cpus": int(option(opts, "cpus-per-task", "1") or 1),
            "deps": deps,
            "kill_on_invalid_dep": option(opts, "kill-on-invalid-dep", "no") == "yes",
            "state": "PENDING",
            "reason": "Dependency" if deps else "None",
            "runner": None,
            "submitted": time.time(),
        }
        save(root, job)
        runner = subprocess.Popen(
            [sys.executable, __file__, "_run", job_id],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: scancel kills the runner and the job together
        )
        job["runner"] = runner.pid
        save(root, job)
    print(job_id if "--parsable" in opts else f"Submitted batch job {job_id}")
    return 0


def pending_reason(root: Path, job: dict[str, Any]) -> str | None:
    """Why ``job`` cannot start yet (None: it can), or ``"cancel"`` when a dependency failed and it must go."""
    if job["cpus"] > int(os.environ.get("FAKE_SLURM_CPUS") or os.cpu_count() or 1):
        return "PartitionConfig"
    states = [(load(root, d) or {}).get("state", "CANCELLED") for d in job["deps"]]
    if any(s in BAD_DEPENDENCY for s in states):
        return "cancel" if job["kill_on_invalid_dep"] else "DependencyNeverSatisfied"
    if any(s != "COMPLETED" for s in states):
        return "Dependency"
    return None


def run_job(job_id: str) -> int:
    """The runner: wait until the job may start, run its script, record how it ended."""
    root = state_dir()
    while True:
        with locked():
            job = load(root, job_id)
            if job is None or job["state"] != "PENDING":
                return 0
            reason = pending_reason(root, job)
            if reason == "cancel":
                job.update(state="CANCELLED", reason="DependencyNeverSatisfied", end=time.time())
            elif reason is None:
                job.update(state="RUNNING", reason="None", start=time.time())
            elif reason == job["reason"]:
                reason = "unchanged"
            else:
                job["reason"] = reason
            if reason != "unchanged":
                save(root, job)
        if job["state"] == "CANCELLED":
            return 0
        if job["state"] == "RUNNING":
            break
        time.sleep(POLL_S)
    env = {
        **os.environ,
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": job["name"],
        "SLURM_CPUS_PER_TASK": str(job["cpus"]),
        "SLURM_SUBMIT_DIR": job["chdir"],
    }
    Path(job["output"]).parent.mkdir(parents=True, exist_ok=True)
    with open(job["output"], "ab") as log:
        code = subprocess.call(["bash", job["script"]], stdout=log, stderr=subprocess.STDOUT, cwd=job["chdir"], env=env)
    transition(job_id, "COMPLETED" if code == 0 else "FAILED", exit_code=code)
    return 0


def known(root: Path, ids: list[str]) -> list[dict[str, Any]]:
    """The jobs among ``ids`` that squeue still lists (finished ones for ``FAKE_SLURM_MIN_JOB_AGE`` seconds)."""
    age = float(os.environ.get("FAKE_SLURM_MIN_JOB_AGE", "300"))
    out = []
    for job_id in ids:
        job = load(root, job_id)
        if job is not None and (job["state"] in ACTIVE or time.time() - job.get("end", 0) < age):
            out.append(job)
    return out


def squeue(args: list[str]) -> int:
    """``squeue --noheader --states=all --jobs=ID,... --format=%i|%T|%r|%j`` (only these fields)."""
    root = state_dir()
    ids = [i for i in (option(args, "jobs", "") or "").split(",") if i]
    if not ids:
        ids = sorted(p.stem for p in (root / "jobs").glob("*.json"))
    jobs = known(root, ids)
    if ids and not jobs and option(args, "jobs"):
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        return 1
    fmt = option(args, "format", "%i %T %r %j") or ""
    for job in jobs:
        fields = {"%i": job["id"], "%T": job["state"], "%r": job["reason"], "%j": job["name"]}
        line = fmt
        for key, value in fields.items():
            line = line.replace(key, str(value))
        print(line)
    return 0


def sacct(args: list[str]) -> int:
    """``sacct --noheader --parsable2 --jobs=ID,... -o JobID,State`` with accounting, else its error."""
    if os.environ.get("FAKE_SLURM_ACCOUNTING") != "1":
        print("sacct: error: Slurm accounting storage is disabled", file=sys.stderr)
        return 1
    root = state_dir()
    for job_id in (option(args, "jobs", "") or "").split(","):
        job = load(root, job_id) if job_id else None
        if job is not None:
            print(f"{job['id']}|{job['state']}")
    return 0


def scancel(args: list[str]) -> int:
    """``scancel ID...``: cancel pending or running jobs (their runner and script are killed)."""
    for job_id in (a for a in args if not a.startswith("-")):
        with locked() as root:
            job = load(root, job_id)
            if job is None or job["state"] not in ACTIVE:
                continue
            job.update(state="CANCELLED", end=time.time())
            save(root, job)
        if job.get("runner"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job["runner"], signal.SIGKILL)
    return 0


def sinfo(args: list[str]) -> int:
    """``sinfo -h -o %T``: one idle node."""
    print("idle")
    return 0


COMMANDS = {"sbatch": sbatch, "squeue": squeue, "sacct": sacct, "scancel": scancel, "sinfo": sinfo}

if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "_run":
        sys.exit(run_job(rest[0]))
    sys.exit(COMMANDS[command](rest))
