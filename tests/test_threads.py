"""Threads follow the allocation: ``num_threads: auto`` resolves to the job's CPUs, and ``--print-jobs`` shows the
number the stack's jobs use."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsna19.core.errors import UserError
from rsna19.core.threads import THREADS_ENV, allocated_threads, machine_cpus, resolve_threads, thread_budget
from rsna19.pipeline.config import load_pipeline
from rsna19.pipeline.executor import run_graph
from rsna19.pipeline.jobs import pipeline_jobs
from rsna19.pipeline.slurm import SlurmOptions, batch_script
from rsna19.pipeline.stages import StackFitJob, StackJob, plan
from rsna19.stacking.config import LgbmConfig
from rsna19.stacking.lgbm import LgbmStacker

PIPELINE = Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "tiny.yaml"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_auto_takes_the_executor_then_slurm_then_the_machine(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert resolve_threads("auto") == machine_cpus() >= 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")
    assert resolve_threads("auto") == 16
    monkeypatch.setenv(THREADS_ENV, "3")
    assert resolve_threads("auto") == allocated_threads() == 3
    assert resolve_threads(5) == 5 and resolve_threads("7") == 7  # a number in the config still wins
    with thread_budget(2):
        assert resolve_threads("auto") == 2
    assert resolve_threads("auto") == 3
    for bad in ("0", "many", -1):
        with pytest.raises(UserError):
            resolve_threads(bad)
    monkeypatch.setenv(THREADS_ENV, "zero")
    with pytest.raises(UserError, match="RSNA19_THREADS='zero'"):
        resolve_threads("auto")


def test_no_config_hard_codes_a_thread_count():
    for path in sorted((CONFIGS / "stack").glob("*.yaml")):
        for line in path.read_text().splitlines():
            if line.strip().startswith("num_threads:"):
                assert line.split(":", 1)[1].split("#")[0].strip() == "auto", f"{path}: {line}"
    assert LgbmConfig().num_threads == "auto"


class _Recorder:
    """A graph job that records the thread budget it ran with."""

    pooled = False
    deps: tuple[str, ...] = ()

    def __init__(self, key: str, cpus: int, seen: dict[str, int]) -> None:
        from rsna19.pipeline.stages import Resources

        self.key, self.resources, self.seen = key, Resources(cpus=cpus), seen

    def done(self) -> bool:
        return False

    def run(self) -> str:
        import torch

        self.seen[self.key] = LgbmStacker(LgbmConfig()).params()["num_threads"]
        self.seen[f"{self.key}/torch"] = torch.get_num_threads()
        return ""


def test_the_executor_gives_each_job_its_cpus(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    seen: dict[str, int] = {}
    import torch

    before = torch.get_num_threads()
    run_graph([_Recorder("a", 3, seen), _Recorder("b", 1, seen)])  # jobs=1: both run in this process
    # torch's threads too: an in-process model job once used every core whatever threads_per_job said.
    assert seen == {"a": 3, "a/torch": 3, "b": 1, "b/torch": 1}
    assert torch.get_num_threads() == before
    assert THREADS_ENV not in __import__("os").environ  # restored after each job


def test_print_jobs_shows_the_threads_the_stack_jobs_use(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    for overrides, fit_threads in ((["jobs=2", "threads_per_job=1"], 1), (["jobs=1"], machine_cpus())):
        cfg = load_pipeline(PIPELINE, overrides)
        lines = pipeline_jobs(tiny_dataset, tmp_path / "w", cfg)
        jobs = {j.key: j for j in plan(tiny_dataset, tmp_path / "w", cfg)}
        fits = [j for j in jobs.values() if isinstance(j, StackFitJob)]
        want = sorted(f"stack/{s}/fold_{k}" for s in ("convex", "lgbm", "mlp") for k in (0, 1))
        assert sorted(j.key for j in fits) == want
        for job in fits:
            head = next(x for x in lines if x.startswith(f"# job {job.key} "))
            cmd = lines[lines.index(head) + 1]
            assert f"{fit_threads} cpu, {fit_threads} threads" in head and "GPU" not in head
            assert cmd.startswith(f"{THREADS_ENV}={fit_threads} rsna19 stack ")
            assert f"--part fit --stacker {job.model} --fold {job.fold}" in cmd
            # What the job's stackers use when the runner gives it its CPUs: the printed number.
            with thread_budget(job.resources.cpus):
                assert LgbmStacker(job.config().lgbm).params()["num_threads"] == fit_threads
        final = jobs["stack"]
        assert isinstance(final, StackJob) and final.split
        assert set(final.deps) == {"stack/features", *(j.key for j in fits)}
        assert jobs["submit"].deps == ("stack",)
    single = {j.key for j in plan(tiny_dataset, tmp_path / "w", load_pipeline(PIPELINE, ["stack_jobs=single"]))}
    assert "stack" in single and not any(k.startswith("stack/") for k in single)


def test_slurm_jobs_take_their_allocation():
    class Job:
        key = "stack/lgbm/fold_0"
        deps = ()

        def commands(self) -> list[list[str]]:
            return [["rsna19", "stack", "x.yaml", "--part", "fit"]]

    text = batch_script(Job(), SlurmOptions(), lambda: "rsna19")
    assert 'export RSNA19_THREADS="${SLURM_CPUS_PER_TASK:-1}"' in text
    assert allocated_threads({"SLURM_CPUS_PER_TASK": "16"}) == 16
    assert allocated_threads({"SLURM_CPUS_PER_TASK": "16", THREADS_ENV: "16"}) == 16
