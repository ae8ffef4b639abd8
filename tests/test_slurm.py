"""The SLURM executor (``rsna19.pipeline.slurm``).

The first tests check the pure parts (sbatch options, batch scripts, config section). The executor's run (the
submission, polling, failure cascade, adoption of queued jobs, unschedulable jobs) is tested twice: in ``make test``
against the fake SLURM of ``tests/slurm/fake/`` (``sbatch`` / ``squeue`` / ``sacct`` / ``scancel`` on ``PATH``,
which really run the batch scripts as background processes), and under the ``slurm`` mark against a real cluster:
``make test-slurm`` starts a single-node one on this machine (``tests/slurm/with_slurm.sh``) and runs them; without
a reachable cluster they are skipped (failed when ``RSNA19_REQUIRE_SLURM=1``, which ``make test-slurm`` sets).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rsna19.core.config import from_dict
from rsna19.core.errors import UserError
from rsna19.pipeline.slurm import (
    JobRequest,
    SlurmJobError,
    SlurmOptions,
    SlurmResources,
    SlurmSection,
    batch_script,
    job_resources,
    kind_of,
    log_stem,
    run_slurm,
    sbatch_args,
)

REPO = Path(__file__).resolve().parents[1]
FAKE_SLURM = Path(__file__).resolve().parent / "slurm" / "fake"


@dataclass(frozen=True)
class Resources:
    """Stand-in for ``rsna19.pipeline.stages.Resources`` (same fields and defaults)."""

    gpus: int = 0
    cpus: int = 1
    mem_gb: float = 4.0
    time_min: int = 60
    partition: str | None = None


SMALL = Resources(cpus=1, mem_gb=0.25, time_min=5)

# A step of the stand-in DAG: fail when an input is missing (so order violations show), optionally sleep or fail,
# then write the output with the time and the SLURM job id.
STEP = """
import os, pathlib, sys, time
out, sleep, fail_unless, *inputs = sys.argv[1:]
missing = [i for i in inputs if not pathlib.Path(i).is_file()]
if missing:
    sys.exit(f"missing inputs: {missing}")
if fail_unless and not pathlib.Path(fail_unless).exists():
    print(f"boom: {out} refuses to run without {fail_unless}", flush=True)
    sys.exit(3)
time.sleep(float(sleep))
pathlib.Path(out).write_text(f"{time.time()} {os.environ.get('SLURM_JOB_ID', '')}\\n")
print(f"wrote {out}")
"""


@dataclass
class StandInJob:
    """Stand-in for ``rsna19.pipeline.stages.Job``: runs ``STEP``; done when its output is newer than its inputs."""

    key: str
    out: Path
    deps: tuple[str, ...] = ()
    inputs: tuple[Path, ...] = ()
    sleep: float = 0.0
    fail_unless: Path | None = None
    resources: Resources = SMALL
    extra: list[list[str]] = field(default_factory=list)

    def done(self) -> bool:
        """Like the pipeline's checks: the output exists and is not older than any input that exists."""
        if not self.out.is_file():
            return False
        t = self.out.stat().st_mtime
        return all(i.stat().st_mtime <= t for i in self.inputs if i.is_file())

    def commands(self) -> list[list[str]]:
        step = [sys.executable, "-c", STEP, str(self.out), str(self.sleep), str(self.fail_unless or "")]
        return [*self.extra, [*step, *map(str, self.inputs)]]

    def run(self) -> None:
        for argv in self.commands():
            subprocess.run(argv, check=True)


def dag(work: Path, fail_unless: Path | None = None) -> list[StandInJob]:
    """a → (b, c) → d, e independent; with ``fail_unless``, c fails until that file exists."""
    o = {k: work / "out" / f"{k}.txt" for k in "abcde"}
    return [
        StandInJob("data/a", o["a"], sleep=2.0, extra=[["rsna19", "--help"]]),
        StandInJob("train/b/fold_0", o["b"], ("data/a",), (o["a"],)),
        StandInJob("train/c/fold_0", o["c"], ("data/a",), (o["a"],), fail_unless=fail_unless),
        StandInJob("stack", o["d"], ("train/b/fold_0", "train/c/fold_0"), (o["b"], o["c"])),
        StandInJob("e", o["e"], sleep=1.0),
    ]


def written(path: Path) -> tuple[float, str]:
    t, job_id = path.read_text().split()
    return float(t), job_id


# ---------------------------------------------------------------- without a cluster


def test_log_stem() -> None:
    assert log_stem("train/clf2d/fold_0") == "train__clf2d__fold_0"
    assert log_stem("index") == "index"
    assert log_stem("a b:c") == "a_b_c"


def test_sbatch_args_follow_resources(tmp_path: Path) -> None:
    cpu = StandInJob("train/x/fold_1", tmp_path / "x", resources=Resources(cpus=3, mem_gb=1.5, time_min=90))
    args = sbatch_args(cpu, tmp_path, SlurmOptions(partition="short", account="lab", extra_args=["--qos=low"]))
    assert "--job-name=rsna19:train/x/fold_1" in args
    assert f"--output={tmp_path.resolve()}/slurm/train__x__fold_1.out" in args
    assert {"--cpus-per-task=3", "--mem=1536M", "--time=90", "--partition=short", "--account=lab"} <= set(args)
    assert not any(a.startswith("--gres") for a in args)
    assert args[-1] == "--qos=low"
    gpu = StandInJob("t", tmp_path / "x", resources=Resources(gpus=2, partition="gpu"))
    args = sbatch_args(gpu, tmp_path, SlurmOptions(partition="short"))
    assert "--gres=gpu:2" in args and "--partition=gpu" in args and "--partition=short" not in args
    args = sbatch_args(gpu, tmp_path, SlurmOptions(resource_override={"gpus": 0, "mem_gb": 0.5}))
    assert not any(a.startswith("--gres") for a in args) and "--mem=512M" in args


def test_batch_script_quotes_and_replaces_rsna19(tmp_path: Path) -> None:
    job = StandInJob("k", tmp_path / "o o", extra=[["rsna19", "train", "cfg with space.yaml", "a=$HOME"]])
    text = batch_script(job, SlurmOptions(env={"FOO": "x y"}, setup=["module load cuda"]), lambda: "/v/bin/rsna19")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash" and "set -e" in lines
    assert "export FOO='x y'" in lines and "module load cuda" in lines
    assert "/v/bin/rsna19 train 'cfg with space.yaml' 'a=$HOME'" in lines
    assert lines.index("module load cuda") < lines.index("/v/bin/rsna19 train 'cfg with space.yaml' 'a=$HOME'")
    with pytest.raises(UserError, match="environment variable"):
        batch_script(job, SlurmOptions(env={"BAD-NAME": "1"}), lambda: "rsna19")


def test_run_slurm_rejects_bad_order(tmp_path: Path) -> None:
    jobs = dag(tmp_path)
    with pytest.raises(UserError, match="topological"):
        run_slurm(list(reversed(jobs)), tmp_path, SlurmOptions())
    with pytest.raises(UserError, match="twice"):
        run_slurm([jobs[0], jobs[0]], tmp_path, SlurmOptions())


def test_slurm_section_changes_resources_per_kind(tmp_path: Path) -> None:
    sec = from_dict(SlurmSection, {"partition": "gpu", "train": {"cpus": 8, "time_min": 30}, "env": {"A": "1"}})
    assert sec.train == SlurmResources(cpus=8, time_min=30) and sec.stack == SlurmResources()
    opts = sec.options(wait=False)
    assert opts.partition == "gpu" and opts.env == {"A": "1"} and opts.wait is False
    assert opts.kind_resources == {"train": {"cpus": 8, "time_min": 30}}
    train = StandInJob("train/m/fold_0", tmp_path / "x", resources=Resources(gpus=1, mem_gb=16))
    assert job_resources(train, opts) == JobRequest(gpus=1, cpus=8, mem_gb=16, time_min=30)
    stack = StandInJob("stack", tmp_path / "x", resources=Resources(cpus=4))
    assert job_resources(stack, opts) == JobRequest(cpus=4)
    opts.resource_override = {"cpus": 1}
    assert job_resources(train, opts).cpus == 1
    opts.resource_override = {"cpu": 1}
    with pytest.raises(UserError, match="unknown field"):
        job_resources(train, opts)
    assert kind_of("predict/x/fold_0") == "predict" and kind_of("embed/s/fold_1") == "embed"
    assert kind_of("submit") == "stack" and kind_of("index") == "data" and kind_of("folds") == "data"


# ---------------------------------------------------------------- on a real cluster


def _require_real_cluster() -> None:
    """Skip (or fail, with RSNA19_REQUIRE_SLURM=1) when no SLURM controller answers."""
    problem = None
    if shutil.which("sinfo") is None:
        problem = "sinfo not on PATH"
    else:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            problem = f"sinfo failed: {proc.stderr.strip()}"
    if problem:
        if os.environ.get("RSNA19_REQUIRE_SLURM") == "1":
            pytest.fail(f"no SLURM cluster: {problem}")
        pytest.skip(f"no SLURM cluster ({problem}); `make test-slurm` starts one")


def _stop_fake_jobs(state: Path) -> None:
    """Kill the runners (and scripts) of fake jobs a test left active: nothing outlives the module."""
    for path in (state / "jobs").glob("*.json"):
        job = json.loads(path.read_text())
        if job["state"] in ("PENDING", "RUNNING") and job.get("runner"):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(job["runner"], signal.SIGKILL)


@pytest.fixture(scope="module", params=["fake", pytest.param("real", marks=pytest.mark.slurm)])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake SLURM of tests/slurm/fake on ``PATH`` (in ``make test``), or a real cluster (``make test-slurm``)."""
    if request.param == "real":
        _require_real_cluster()
        yield "real"
        return
    with _fake_slurm(tmp_path_factory.mktemp("fake_slurm")):
        yield "fake"


@contextlib.contextmanager
def _fake_slurm(state: Path) -> Iterator[None]:
    """tests/slurm/fake first on ``PATH``, its state in ``state``, a 2-CPU node; its jobs stopped at the end."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("FAKE_SLURM_DIR", str(state))
        mp.setenv("FAKE_SLURM_PYTHON", sys.executable)
        mp.setenv("FAKE_SLURM_CPUS", "2")
        try:
            yield
        finally:
            _stop_fake_jobs(state)


@pytest.fixture
def fake_cluster(tmp_path: Path) -> Iterator[None]:
    """The fake SLURM only (for what a real cluster cannot be told to do, such as forgetting jobs at once)."""
    with _fake_slurm(tmp_path / "fake_slurm"):
        yield


@pytest.fixture(scope="module")
def real_cluster() -> None:
    """A real cluster only (the tiny pipeline takes minutes of real jobs)."""
    _require_real_cluster()


def quick(**kw: object) -> SlurmOptions:
    return SlurmOptions(poll_s=0.5, **kw)  # type: ignore[arg-type]


def jobs_json(work: Path) -> dict:
    return json.loads((work / "slurm" / "jobs.json").read_text())["jobs"]


def test_dag_runs_in_dependency_order_and_resumes(cluster: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    lines: list[str] = []
    jobs = dag(work)
    run_slurm(jobs, work, quick(), say=lines.append)

    # all five were submitted at once (afterok chains, not one by one), each in its own SLURM job
    rec = jobs_json(work)
    ids = {k: v["job_id"] for k, v in rec.items()}
    assert all(ids.values()) and len(set(ids.values())) == 5
    assert {v["state"] for v in rec.values()} == {"COMPLETED"}
    t = {j.key: written(j.out) for j in jobs}
    assert {k: v[1] for k, v in t.items()} == ids  # the step ran inside the recorded job
    assert t["data/a"][0] < t["train/b/fold_0"][0] < t["stack"][0]
    assert t["data/a"][0] < t["train/c/fold_0"][0] < t["stack"][0]
    assert "--dependency" not in " ".join(rec["data/a"]["sbatch_args"])  # the dependency is a call argument
    # logs: one per key, with the job's own lines and the rsna19 executable of this venv
    log_a = work / "slurm" / "data__a.out"
    assert "[rsna19] data/a: slurm job" in log_a.read_text() and "usage: rsna19" in log_a.read_text()
    assert "wrote" in (work / "slurm" / "train__b__fold_0.out").read_text()
    script = (work / "slurm" / "data__a.sh").read_text()
    assert f"{Path(sys.executable).parent / 'rsna19'} --help" in script

    # re-run: everything is done, nothing is submitted
    lines.clear()
    run_slurm(jobs, work, quick(), say=lines.append)
    assert any("5 done (skipped), 0 submitted" in line for line in lines), lines
    assert {k: written(j.out) for k, j in zip(ids, jobs)} == t

    # c's output lost: c is re-run; stack was done, but after c re-ran it is stale and is re-run too
    jobs[2].out.unlink()
    lines.clear()
    run_slurm(jobs, work, quick(), say=lines.append)
    assert any("3 done (skipped), 1 submitted, 1 waiting" in line for line in lines), lines
    t2 = {j.key: written(j.out) for j in jobs}
    for k in ("data/a", "train/b/fold_0", "e"):
        assert t2[k] == t[k]
    assert t2["train/c/fold_0"][0] < t2["stack"][0] and t2["stack"][1] != t["stack"][1]


def test_failure_is_reported_and_dependents_cancelled(cluster: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    flag = tmp_path / "fixed"
    jobs = dag(work, fail_unless=flag)
    lines: list[str] = []
    with pytest.raises(SlurmJobError) as err:
        run_slurm(jobs, work, quick(), say=lines.append)
    assert list(err.value.failed) == ["train/c/fold_0"]
    assert err.value.cancelled == ["stack"]
    msg = str(err.value)
    assert "train/c/fold_0" in msg and "FAILED" in msg and "boom:" in msg  # key, state and the log's tail
    assert any(line.startswith("[slurm] FAILED train/c/fold_0") for line in lines)
    rec = jobs_json(work)
    assert rec["stack"]["state"] == "CANCELLED" and rec["train/c/fold_0"]["state"] == "FAILED"
    assert not jobs[3].out.exists()
    assert jobs[0].out.exists() and jobs[1].out.exists() and jobs[4].out.exists()  # the other branches ran

    # fixed: the resume submits only the failed job and the cancelled one
    flag.touch()
    lines.clear()
    run_slurm(jobs, work, quick(), say=lines.append)
    assert any("3 done (skipped), 2 submitted" in line for line in lines), lines
    assert all(j.done() for j in jobs)


def test_no_wait_then_resume_adopts_queued_jobs(cluster: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    jobs = dag(work)
    run_slurm(jobs, work, quick(wait=False), say=lambda _: None)
    first = {k: v["job_id"] for k, v in jobs_json(work).items()}
    assert all(first.values())
    lines: list[str] = []
    run_slurm(jobs, work, quick(), say=lines.append)  # as if the driver had died and been started again
    second = jobs_json(work)
    for k, v in second.items():  # adopted (or finished meanwhile), never submitted twice
        assert (v["job_id"] or v["previous_job_id"]) == first[k]
    assert sum("from an earlier call" in line for line in lines) >= 3, lines
    assert all(j.done() for j in jobs)


@pytest.mark.slurm
def test_tiny_pipeline_on_slurm_matches_local_run(real_cluster: None, tmp_path: Path) -> None:
    """``configs/pipelines/tiny.yaml`` through ``run_slurm(plan(...))``: the local run's submission, then nothing to do.

    Both runs use one torch thread a process (``OMP_NUM_THREADS=1``; the batch scripts set it to
    ``--cpus-per-task``): float sums in another thread count differ in the last bits, and the stackers magnify
    that to ~1e-5 in the submission.

    Two of the six models by default, the 2D one and the sequence model that reads its embeddings (15 jobs,
    every kind of job and dependency of the plan); ``RSNA19_SLURM_ALL_MODELS=1`` runs all six (31 jobs; each one
    a fresh process that imports torch, about 9 min on two busy cores against 4 for the two).
    """
    import numpy as np
    import pandas as pd

    stages = pytest.importorskip("rsna19.pipeline.stages")
    from rsna19.pipeline.config import load_pipeline

    exe = str(Path(sys.executable).parent / "rsna19")
    data, local, work = tmp_path / "data", tmp_path / "local", tmp_path / "slurm"
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    overrides = (
        [] if os.environ.get("RSNA19_SLURM_ALL_MODELS") == "1" else ["models=[../tiny/clf2d.yaml,../tiny/seq.yaml]"]
    )
    for argv in (
        [exe, "synth", str(data), "--preset", "tiny"],
        [exe, "run", "--data", str(data), "--out", str(local), "--pipeline", "tiny", *overrides],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, env=one_thread, cwd=REPO)
        assert proc.returncode == 0, f"{argv}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    cfg = load_pipeline("tiny", overrides)
    jobs = stages.plan(data, work, cfg)
    # the test node has 2 CPUs and ~19 GB: ask for less than the real jobs do (the stack wants 4 CPUs, 16 GB)
    opts = SlurmOptions(poll_s=1.0, resource_override={"cpus": 1, "mem_gb": 3})
    lines: list[str] = []
    run_slurm(jobs, work, opts, say=lines.append)
    assert any(f"0 done (skipped), {len(jobs)} submitted" in line for line in lines), lines[:3]
    rec = jobs_json(work)
    assert set(rec) == {j.key for j in jobs} and {v["state"] for v in rec.values()} == {"COMPLETED"}

    a = pd.read_csv(local / "submission.csv")
    b = pd.read_csv(work / "submission.csv")
    assert a["ID"].tolist() == b["ID"].tolist()
    assert np.abs(a["Label"].to_numpy() - b["Label"].to_numpy()).max() <= 1e-6
    assert (work / "scores.csv").is_file()

    jobs = stages.plan(data, work, cfg)
    assert all(j.done() for j in jobs)
    lines.clear()
    run_slurm(jobs, work, opts, say=lines.append)
    assert any(f"{len(jobs)} done (skipped), 0 submitted" in line for line in lines), lines


def test_job_that_can_never_start_is_reported(cluster: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    jobs = dag(work)[:2]
    jobs[0].resources = Resources(cpus=512, mem_gb=0.25, time_min=5)  # more CPUs than any node of the cluster
    lines: list[str] = []
    with pytest.raises(SlurmJobError) as err:
        run_slurm(jobs, work, quick(unschedulable_s=2.0), say=lines.append)
    assert list(err.value.failed) == ["data/a"] and err.value.cancelled == ["train/b/fold_0"]
    assert "--cpus-per-task=512" in str(err.value) and "slurm section" in str(err.value)
    assert any("pending, reason" in line for line in lines), lines
    assert jobs_json(work)["data/a"]["state"] == "UNSCHEDULABLE"


@pytest.mark.parametrize("accounting", [True, False], ids=["sacct", "no-accounting"])
def test_jobs_squeue_forgot_are_read_from_sacct_or_their_outputs(
    fake_cluster: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, accounting: bool
) -> None:
    """Finished jobs leave squeue after MinJobAge (0 s here): their end state then comes from sacct, or, on a
    cluster without accounting, from the job's own outputs (a job whose outputs are missing failed)."""
    monkeypatch.setenv("FAKE_SLURM_MIN_JOB_AGE", "0")
    monkeypatch.setenv("FAKE_SLURM_ACCOUNTING", "1" if accounting else "0")
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    jobs = [j for j in dag(work, fail_unless=tmp_path / "never") if j.key in ("data/a", "train/c/fold_0", "e")]
    jobs[0].extra = []
    lines: list[str] = []
    with pytest.raises(SlurmJobError) as err:
        run_slurm(jobs, work, quick(), say=lines.append)
    state = "FAILED" if accounting else "UNKNOWN_FAILED"
    assert list(err.value.failed) == ["train/c/fold_0"] and f"ended {state}" in str(err.value)
    rec = jobs_json(work)
    assert rec["data/a"]["state"] == rec["e"]["state"] == "COMPLETED"
    assert rec["train/c/fold_0"]["state"] == state
    assert jobs[0].out.exists() and jobs[2].out.exists()
