"""``rsna19 stack CONFIG [key=value ...]``: the second level (features, stackers, blend, scores)."""

from __future__ import annotations

import argparse

from rsna19.core.config import load_config
from rsna19.core.errors import UserError
from rsna19.stacking.config import StackConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with second_level/train.py and second_level/build_features.py."""
    parser.add_argument("config", help="stack config YAML, e.g. configs/stack/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. lgbm.num_boost_round=200")
    parser.add_argument("--runs", help="root of the base-model runs (overrides `runs`)")
    parser.add_argument("--folds", dest="folds_csv", help="folds.csv of the base models (overrides `folds_csv`)")
    parser.add_argument("--out", help="output root; results go to OUT/<name>/ (overrides `out`)")
    parser.add_argument("--test-labels", help="Kaggle-format test labels csv, fills wll_test (overrides `test_labels`)")


def config_from_args(args: argparse.Namespace) -> StackConfig:
    """The stack config with the file, the overrides and the path options applied (options win)."""
    overrides = list(args.overrides)
    for key in ("runs", "folds_csv", "out", "test_labels"):
        value = getattr(args, key, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(StackConfig, args.config, overrides)


def run(args: argparse.Namespace) -> int:
    """Run the stage (or one part of a split stack) and print the score table."""
    from rsna19.stacking.parts import finish_stack, run_features, run_fit  # heavy imports only when used
    from rsna19.stacking.run import print_scores, run_stack

    cfg = config_from_args(args)
    if args.part == "features":
        print(f"stack: level-2 features in {run_features(cfg)}")
        return 0
    if args.part == "fit":
        if args.stacker is None or args.fold is None:
            raise UserError("--part fit needs --stacker NAME and --fold K")
        print(f"stack: level-2 fit in {run_fit(cfg, args.stacker, args.fold)}")
        return 0
    result = finish_stack(cfg, force=args.force) if args.part == "finish" else run_stack(cfg, force=args.force)
    if result.skipped:
        print(f"stack: {result.out_dir} is complete (use --force to recompute)")
    print_scores(result)
    print(f"stack: outputs in {result.out_dir}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``stack`` subcommand."""
    parser = subparsers.add_parser(
        "stack",
        help="second level: stack base-model predictions with LightGBM / MLP / convex blend",
        description=(
            "Build neighbour-slice features from the base models' OOF and test predictions, fit the stackers by "
            "level-2 CV on the same patient folds, blend them and write OUT/<name>/{oof,test}.parquet and "
            "scores.csv (one row per base model, their mean, each stacker and the blend)."
        ),
    )
    add_arguments(parser)
    parser.add_argument("--force", action="store_true", help="recompute a finished stack output")
    parser.add_argument(
        "--part",
        choices=("features", "fit", "finish"),
        help="one job of a split stack: the level-2 features, one stacker on one level-2 fold (--stacker, --fold), "
        "or the final job that combines the fits, blends and writes OUT/<name>/ (default: everything at once)",
    )
    parser.add_argument("--stacker", help="with --part fit: the stacker (convex, lgbm, mlp, ...)")
    parser.add_argument("--fold", type=int, help="with --part fit: the held-out level-2 fold")
    parser.set_defaults(func=run)
