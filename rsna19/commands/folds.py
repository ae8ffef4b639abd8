"""``rsna19 folds INDEX --out folds.csv``: patient-grouped, label-stratified folds, written once."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "folds",
        help="make patient-grouped, label-stratified folds (folds.csv)",
        description="Assign every training patient a fold with StratifiedGroupKFold (grouped by patient, "
        "stratified on study-level labels). An existing output is kept unless --force. Then the leakage checks "
        "run (no slice, series or study in both the training and the test rows; a patient in both only warns).",
    )
    p.add_argument("index", help="index.parquet, cache_index.parquet or a cache directory")
    p.add_argument("--out", required=True, help="folds.csv to write")
    p.add_argument("--n-folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite an existing folds file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd

    from rsna19.data.datasets import read_cache_index
    from rsna19.data.folds import write_folds
    from rsna19.pipeline.layout import check_no_leakage

    folds = write_folds(args.index, args.out, n_folds=args.n_folds, seed=args.seed, force=args.force)
    sizes = folds["fold"].value_counts().sort_index()
    print(f"{args.out}: {len(folds)} patients; per fold: " + ", ".join(f"{k}: {v}" for k, v in sizes.items()))
    rows = read_cache_index(args.index) if Path(args.index).is_dir() else pd.read_parquet(args.index)
    if "split" in rows.columns:
        for warning in check_no_leakage(rows, folds):
            print(f"warning: {warning}")
        print("leakage checks passed")
    return 0
