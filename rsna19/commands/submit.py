"""``rsna19 submit STACK_DIR --out submission.csv``: the Kaggle csv from a finished stack."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared with second_level/generate_submission.py."""
    parser.add_argument("stack_dir", help="a finished stack output, e.g. stack/demo")
    parser.add_argument("--out", required=True, help="submission csv to write")
    parser.add_argument("--which", default="blend", help="method to submit: blend, lgbm, mlp, convex, mean (blend)")
    parser.add_argument("--sample-submission", help="stage_2_sample_submission.csv: IDs must match it exactly")


def run(args: argparse.Namespace) -> int:
    """Write and validate the submission."""
    from rsna19.stacking.submit import write_stack_submission

    path = write_stack_submission(args.stack_dir, args.out, args.which, args.sample_submission)
    print(f"submit: {args.which} predictions written to {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``submit`` subcommand."""
    parser = subparsers.add_parser(
        "submit",
        help="write the validated Kaggle csv from a stack output",
        description="Turn one method's test predictions of STACK_DIR/test.parquet into a Kaggle ID,Label csv.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
