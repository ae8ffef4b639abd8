"""``rsna19 score SUBMISSION LABELS``: validate a submission and score it against a label csv."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``score`` subcommand."""
    p = subparsers.add_parser(
        "score",
        help="score a Kaggle submission csv against labels (ID,Label)",
        description=(
            "Validate SUBMISSION (every slice × 6 classes once, probabilities finite in [0, 1]) and score it "
            "against LABELS in the same ID,Label format: weighted log loss, per-class log loss and AUC. "
            "Exits 1 naming the first bad row if the submission is invalid."
        ),
    )
    p.add_argument("submission", metavar="SUBMISSION", help="submission csv (ID,Label)")
    p.add_argument("labels", metavar="LABELS", help="label csv (ID,Label), e.g. test_labels.csv")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the score table."""
    from rsna19.inference.submission import format_scores, score_submission

    print(format_scores(score_submission(args.submission, args.labels)))
    return 0
