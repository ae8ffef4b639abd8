"""``rsna19 evaluate SOURCE --labels CSV --out DIR``: AUC, sensitivity / specificity at the operating point, Brier
score and calibration error per class, at study and slice level, with ROC and reliability plots."""

from __future__ import annotations

import argparse

from rsna19.commands.bundle import add_study_model_arguments, study_model_options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` subcommand."""
    p = subparsers.add_parser(
        "evaluate",
        help="score a stack's test predictions or predict-study outputs: AUC, sens/spec, Brier, ECE, plots",
        description=(
            "SOURCE is a stack folder (STACK/<name>/ with test.parquet) or a predict-study output folder (slices.csv, "
            "studies.json). Per class, at study level (calibrated probability; and the uncalibrated study score) and "
            "slice level: AUC, sensitivity and specificity at the operating point, Brier score and expected "
            "calibration error. Writes DIR/evaluation.csv, evaluation.json, roc.png and reliability.png. The "
            "operating points come from --bundle, from studies.json, or (a stack without --bundle) from a study "
            "model fitted on the stack's oof.parquet like `rsna19 bundle` does."
        ),
    )
    p.add_argument(
        "source", help="stack folder, predict-study output folder, or (with --bundle) a folder or zip of DICOM studies"
    )
    p.add_argument("--labels", required=True, help="ID,Label csv (slice labels) or study_uid csv (study labels)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--bundle", help="bundle whose study model gives calibration and operating points")
    p.add_argument("--which", help="stack method of a stack folder (default: blend)")
    add_study_model_arguments(p)
    p.add_argument("--bins", type=int, default=10, help="equal-width bins of the calibration error (10)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the table."""
    from rsna19.study.evaluate import evaluate, format_table

    options = study_model_options(args)
    table = evaluate(
        args.source, args.labels, args.out, bundle=args.bundle, which=args.which, n_bins=args.bins, **options
    )
    print(format_table(table))
    print(f"evaluate: evaluation.csv, evaluation.json, roc.png, reliability.png in {args.out}")
    return 0
