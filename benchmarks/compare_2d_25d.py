"""2D vs 2.5D on the demo data, same backbone and budget: OOF weighted log loss over every fold.

Trains ``configs/demo/clf2d.yaml`` (1 slice × 3 windows) and ``configs/demo/clf2dc_3c.yaml`` (3 slices × 3
windows, same ResNet-10t, lr, batch and schedule) on every fold of a finished ``rsna19 demo`` (its cache and
folds), with the same ``--epochs`` and ``--seed`` for both, then predicts the held-out fold (TTA none + hflip)
and prints the table. Runs resume: finished folds are kept. Issue 4's claim: the 2.5D model's OOF is lower.

    rsna19 demo --out /tmp/demo                       # once: data, cache, folds
    python benchmarks/compare_2d_25d.py --demo /tmp/demo --epochs 28      # ~35 min on 2 cores, 2 jobs
    python benchmarks/compare_2d_25d.py --quick       # tiny preset and pipeline (seconds): the script runs
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import add_common_arguments, write_json  # noqa: E402
from oof_scores import score  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = ("clf2d", "clf2dc_3c")


def _run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:5])} … failed (exit {proc.returncode}); log: {log}")


def train_and_predict(demo: Path, runs: Path, config: Path, fold: int, overrides: list[str]) -> Path:
    """Train one model × fold (resuming) and write its OOF parquet; returns the parquet."""
    cli = [sys.executable, "-m", "rsna19.cli"]
    paths = ["--cache", str(demo / "cache"), "--folds", str(demo / "folds.csv")]
    name = config.stem
    logs = runs / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    oof = runs / name / f"fold_{fold}" / "oof.parquet"
    if not oof.is_file():
        train = [*cli, "train", str(config), "--fold", str(fold), *paths, "--runs", str(runs), *overrides]
        _run(train, logs / f"train_{name}_{fold}.log")
        predict = [*cli, "predict", str(runs / name), "--fold", str(fold), "--split", "oof", *paths]
        _run([*predict, "--tta", "none", "hflip", "--device", "cpu"], logs / f"predict_{name}_{fold}.log")
    return oof


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, help="a finished `rsna19 demo --out DIR` (cache/ and folds.csv)")
    p.add_argument("--runs", type=Path, help="where the runs go (default: DEMO/compare_2d_25d_e<epochs>_s<seed>)")
    p.add_argument("--epochs", type=int, default=28, help="train.epochs for both models")
    p.add_argument("--seed", type=int, default=42, help="train.seed for both models")
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time (one torch thread each)")
    add_common_arguments(p)
    args = p.parse_args()

    configs = [REPO / "configs" / "demo" / f"{m}.yaml" for m in MODELS]
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            demo = Path(tmp)
            cli = [sys.executable, "-m", "rsna19.cli"]
            subprocess.run([*cli, "synth", str(demo / "data"), "--preset", "tiny"], check=True, capture_output=True)
            run = [*cli, "run", "--data", str(demo / "data"), "--out", str(demo), "--pipeline", "tiny"]
            subprocess.run(run, check=True, capture_output=True)  # the tiny pipeline: its cache and folds
            configs = [REPO / "configs" / "tiny" / "clf2d.yaml", REPO / "configs" / "tiny" / "clf2dc_5c.yaml"]
            args.epochs = 1
        elif args.demo is None:
            p.error("--demo DIR is required (a finished `rsna19 demo --out DIR`), or --quick")
        else:
            demo = args.demo
        runs = args.runs or demo / f"compare_2d_25d_e{args.epochs}_s{args.seed}"
        n_folds = int(pd.read_csv(demo / "folds.csv")["fold"].max()) + 1
        overrides = [f"train.epochs={args.epochs}", f"train.seed={args.seed}", "train.progress=false"]
        overrides.append("data.num_workers=0")
        jobs = [(c, k) for c in configs for k in range(n_folds)]
        with ThreadPoolExecutor(args.jobs) as pool:
            files = list(pool.map(lambda job: train_and_predict(demo, runs, job[0], job[1], overrides), jobs))
        rows = []
        for config in configs:
            df = pd.concat([pd.read_parquet(f) for f, (c, _) in zip(files, jobs) if c == config], ignore_index=True)
            per_fold = {int(k): score(g) for k, g in df.groupby("fold")}
            rows.append((config.stem, score(df), per_fold))
    print(f"\n2D vs 2.5D on {demo}: {args.epochs} epochs, seed {args.seed}, runs in {runs}")
    print(f"| model | OOF wll | {' | '.join(f'fold {k}' for k in range(n_folds))} |")
    print(f"|---|---:|{'---:|' * n_folds}")
    for name, total, per in rows:
        print(f"| {name} | {total:.4f} | {' | '.join(f'{per[k]:.4f}' for k in range(n_folds))} |")
    write_json(
        args,
        "compare_2d_25d",
        f"2D vs 2.5D OOF wll on the demo data, {args.epochs} epochs, seed {args.seed}",
        "the 2.5D model's OOF weighted log loss is lower than the 2D model's",
        [{"case": f"{name} OOF wll", "value": total, "unit": "wll"} for name, total, _ in rows],
        None if args.quick else rows[1][1] < rows[0][1],
        {"epochs": args.epochs, "seed": args.seed},
    )


if __name__ == "__main__":
    main()
