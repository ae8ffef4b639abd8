"""``rsna19 train CONFIG --fold k [key=value ...]``: train one fold of a base model (DDP under torchrun)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared with ``models/train.py``."""
    p.add_argument("config", help="YAML experiment config (configs/...)")
    p.add_argument("--fold", type=int, required=True, help="validation fold k")
    p.add_argument("--cache", help="conversion cache (default: $RSNA19_CACHE)")
    p.add_argument("--folds", help="folds.csv (default: $RSNA19_FOLDS)")
    p.add_argument("--runs", help="runs directory (default: $RSNA19_RUNS)")
    p.add_argument("--masks", help="subtype masks/ folder for segmentation-aided models (default: $RSNA19_MASKS)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train one fold of a base model",
        description="Train fold k of CONFIG into RUNS/<name>/fold_<k>/; resumes from last.pt if present. "
        "Under `torchrun --nproc_per_node N` it trains with DistributedDataParallel.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rsna19.core.config import load_config
    from rsna19.engine.config import TrainConfig, resolve_paths
    from rsna19.training.trainer import train

    cfg = resolve_paths(
        load_config(TrainConfig, args.config, args.overrides),
        args.cache,
        args.folds,
        args.runs,
        getattr(args, "masks", None),
    )
    run_dir = train(cfg, args.fold)
    print(run_dir)
    return 0
