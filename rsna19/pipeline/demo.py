"""``rsna19 demo``: the synthetic ``demo`` dataset, then the demo pipeline on it, scored on its test labels."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from rsna19.pipeline.config import load_pipeline
from rsna19.pipeline.run import PipelineResult, run_pipeline
from rsna19.pipeline.stages import STAGES
from rsna19.synth import generate_dataset


def run_demo(
    out: str | os.PathLike[str],
    pipeline: str = "demo",
    overrides: list[str] | tuple[str, ...] = (),
    seed: int = 0,
    preset: str = "demo",
    workers: int | None = None,
    progress: bool = False,
    say: Callable[[str], None] = print,
) -> tuple[PipelineResult, float]:
    """Write ``OUT/data`` (``rsna19 synth --preset demo``) and run the pipeline into ``OUT``.

    Args:
        out: the demo folder: ``OUT/data`` holds the dataset, the rest are the pipeline's outputs.
        pipeline: pipeline config (default ``configs/pipelines/demo.yaml``).
        overrides: pipeline overrides.
        seed: the dataset's seed.
        preset: the synthetic preset (:mod:`rsna19.synth.presets`; ``demo``, or ``demo60`` / ``context`` for the
            second-level and context checks).
        workers: processes rendering the dataset (default: all CPUs).
        progress: show the stages' own progress bars.
        say: where the progress lines go.

    Returns:
        The pipeline's result and the total wall time in seconds (dataset included).
    """
    t0 = time.perf_counter()
    cfg = load_pipeline(pipeline, list(overrides))
    data = Path(out) / "data"
    n_workers = workers or os.cpu_count() or 1
    summary = generate_dataset(data, preset=preset, seed=seed, workers=n_workers, progress=progress)
    state = "skipped" if summary.get("skipped") else f"{time.perf_counter() - t0:7.1f} s"
    say(f"[0/{len(STAGES)}] synth    {state:>10}  {data}: {preset} preset, seed {seed}")
    synth_s = time.perf_counter() - t0
    result = run_pipeline(data, out, cfg, progress=progress, say=say)
    result.timings = {"synth": synth_s, **result.timings}
    result.skipped = {"synth": bool(summary.get("skipped")), **result.skipped}
    return result, time.perf_counter() - t0
