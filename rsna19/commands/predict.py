"""``rsna19 predict RUN --fold k --split oof|test [--tta ...]``: prediction parquet of one fold's model."""

from __future__ import annotations

import argparse

from rsna19.core.constants import DEFAULT_TTA


def add_checkpoint_arguments(p: argparse.ArgumentParser, tta_help: str) -> None:
    """The options of ``predict`` and ``embed`` that make their ``CheckpointOptions``, and the run's paths."""
    p.add_argument("--tta", nargs="+", default=list(DEFAULT_TTA), help=tta_help)
    p.add_argument("--checkpoint", choices=("best", "last"), default="best")
    p.add_argument("--cache", help="override the run's cache path")
    p.add_argument("--folds", help="override the run's folds.csv")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--num-workers", type=int, help="loader processes (default: the run's data.num_workers)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments shared with ``models/predict.py``."""
    p.add_argument("run", help="run directory RUNS/<config name> (or its fold_<k>)")
    p.add_argument("--fold", type=int, required=True, help="fold k")
    p.add_argument("--split", choices=("oof", "test"), default="oof", help="held-out patients or the test set")
    add_checkpoint_arguments(p, "views: none hflip vflip transpose")
    p.add_argument("--out", help="output parquet (default: RUN/fold_<k>/<split>.parquet)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict OOF or test slices with one fold's model (+TTA)",
        description="Predict the OOF or test slices of one fold's model. An image model whose embeddings of the split "
        "are current (rsna19 embed, written after best.pt with the same single TTA view) is not run again: the "
        "predictions are the sigmoid of the embeddings' logits, the same forward pass.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rsna19.engine.embed import CheckpointOptions
    from rsna19.inference.predict import predict

    options = CheckpointOptions(args.checkpoint, args.tta, args.device, args.batch_size, args.num_workers)
    path = predict(args.run, args.fold, args.split, options, cache=args.cache, folds=args.folds, out=args.out)
    print(path)
    return 0
