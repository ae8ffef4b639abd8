"""``rsna19 embed RUN --fold k [--splits train oof test]``: per-slice embeddings of one fold's image model."""

from __future__ import annotations

import argparse

from rsna19.commands.predict import add_checkpoint_arguments
from rsna19.core.constants import EMBED_SPLITS


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``rsna19 embed``."""
    p.add_argument("run", help="run directory RUNS/<config name> (or its fold_<k>) of a 2D / 2.5D model")
    p.add_argument("--fold", type=int, required=True, help="fold k: its model embeds every split")
    p.add_argument(
        "--splits",
        nargs="+",
        choices=EMBED_SPLITS,
        default=list(EMBED_SPLITS),
        help="train: fold k's training patients; oof: its held-out patients; test: the test set",
    )
    add_checkpoint_arguments(p, "views averaged: none hflip vflip transpose")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage of the features")
    p.add_argument("--overwrite", action="store_true", help="recompute splits that are already complete")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "embed",
        help="per-slice embeddings of one fold's 2D/2.5D model (input of the sequence model)",
        description="Write RUN/fold_<k>/embeddings_<split>.{npy,parquet,json}: the pooled features of fold k's "
        "model, averaged over TTA views. All splits come from fold k's model, so the sequence model's OOF is honest.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rsna19.engine.embed import CheckpointOptions, extract_embeddings

    options = CheckpointOptions(args.checkpoint, args.tta, args.device, args.batch_size, args.num_workers)
    paths = extract_embeddings(
        args.run, args.fold, args.splits, options, args.cache, args.folds, dtype=args.dtype, overwrite=args.overwrite
    )
    for p in paths.values():
        print(p)
    return 0
