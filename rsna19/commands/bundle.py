"""``rsna19 bundle WORK --out BUNDLE``: the inference bundle of a finished ``rsna19 run`` (no pickles)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bundle`` subcommand."""
    p = subparsers.add_parser(
        "bundle",
        help="export the trained models + stacker of a `rsna19 run` folder for predict-study",
        description=(
            "Write BUNDLE/: each base model's fold weights as safetensors with their resolved configs, the stacker "
            "(LightGBM text dumps, MLP safetensors + JSON scaler, convex / blend weights as JSON) and bundle.json "
            "(versions, classes, windows, conversion crop, TTA, checksums). Loading never unpickles anything."
        ),
    )
    p.add_argument("work", help="work folder of a finished `rsna19 run` / `rsna19 demo`")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--models", nargs="+", help="base models to include (default: all of the pipeline)")
    p.add_argument("--folds", nargs="+", type=int, help="folds to include (default: all)")
    p.add_argument("--which", help="stack method: blend, lgbm, mlp, convex, mean (default: the pipeline's submit)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print what went in."""
    from rsna19.bundle import export_bundle

    res = export_bundle(args.work, args.out, args.models, args.folds, args.which, force=args.force)
    print(f"bundle: {', '.join(res.models)} × folds {res.folds} + stacker -> {res.path}")
    return 0
