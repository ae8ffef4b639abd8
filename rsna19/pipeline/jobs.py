"""``rsna19 run ... --print-jobs``: the pipeline as shell commands, for a cluster scheduler.

The output has three groups: the data stages (run once, in order), one line per base model × fold (independent
of each other: train, then predict OOF and test; give each its own GPU), and the final stages (stack, submit)
that need every model × fold line finished. ``rsna19 run`` with the same arguments afterwards skips everything
that the jobs did and only prints the table.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from rsna19.pipeline.config import PipelineConfig
from rsna19.pipeline.run import WorkPaths, find_layout, stack_overrides, train_overrides


def _cmd(*parts: object) -> str:
    return " ".join(shlex.quote(str(p)) for p in parts)


def pipeline_jobs(
    data_dir: str | os.PathLike[str],
    work: str | os.PathLike[str],
    cfg: PipelineConfig,
    pipeline_arg: str | None = None,
) -> list[str]:
    """Shell lines (comments start with ``#``) that run the pipeline stage by stage.

    Args:
        data_dir: the RSNA-layout folder.
        work: the work folder.
        cfg: the pipeline config (paths resolved).
        pipeline_arg: how the user named the pipeline (for the closing ``rsna19 run`` line).
    """
    from rsna19.config import load_config
    from rsna19.stacking.config import StackConfig

    layout = find_layout(data_dir)
    p = WorkPaths(Path(work))
    c = cfg.convert
    lines = ["# 1. data stages (once, in order)"]
    dirs = [layout.train_dir] + ([layout.test_dir] if layout.test_dir else [])
    lines.append(
        _cmd("rsna19", "index", *dirs, "--labels", layout.train_csv, "--out", p.index, "--workers", cfg.index_workers)
    )
    convert = ["rsna19", "convert", p.index, "--out", p.cache, "--workers", c.workers, "--crop", c.crop or 0]
    if c.spacing:
        convert += ["--spacing", c.spacing]
    if not c.correct_tilt:
        convert.append("--no-tilt-correction")
    lines.append(_cmd(*convert))
    lines.append(_cmd("rsna19", "folds", p.cache, "--out", p.folds, "--n-folds", cfg.n_folds, "--seed", cfg.folds_seed))
    lines.append(f"# 2. one job per base model x fold ({len(cfg.models)} x {cfg.n_folds}; independent, one GPU each)")
    paths = ["--cache", p.cache, "--folds", p.folds, "--runs", p.runs]
    for config in cfg.models:
        name = Path(config).stem
        for k in range(cfg.n_folds):
            run_dir = p.runs / name
            step = [_cmd("rsna19", "train", config, "--fold", k, *paths, *train_overrides(cfg, name))]
            for split in ("oof", "test"):
                pred = ["rsna19", "predict", run_dir, "--fold", k, "--split", split, "--tta", *cfg.tta]
                pred += ["--device", cfg.device]
                if cfg.predict_batch_size:
                    pred += ["--batch-size", cfg.predict_batch_size]
                step.append(_cmd(*pred))
            lines.append(" && ".join(step))
    lines.append("# 3. after every job above: second level and submission")
    overrides = stack_overrides(cfg, p, layout)
    lines.append(_cmd("rsna19", "stack", cfg.stack, *overrides))
    stack_name = load_config(StackConfig, cfg.stack, overrides).name
    submit = ["rsna19", "submit", p.stack / stack_name, "--out", p.submission, "--which", cfg.submit]
    if layout.sample_submission:
        submit += ["--sample-submission", layout.sample_submission]
    lines.append(_cmd(*submit))
    lines.append("# or, equivalently, let `rsna19 run` finish (it skips what the jobs did) and print the table:")
    lines.append(_cmd("rsna19", "run", "--data", layout.root, "--out", p.work, "--pipeline", pipeline_arg or cfg.name))
    return lines
