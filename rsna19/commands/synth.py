"""``rsna19 synth OUT --preset tiny|demo|context``: write a synthetic dataset in the RSNA layout."""

from __future__ import annotations

import argparse
import os

from rsna19.synth import PRESETS, format_summary, generate_dataset


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``synth`` subcommand."""
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic RSNA-format dataset (DICOM + label csv + masks)",
        description=(
            "Write a synthetic head-CT dataset in the RSNA 2019 layout: stage_2_train/ and stage_2_test/ "
            "(ID_*.dcm), stage_2_train.csv, stage_2_sample_submission.csv, test_labels.csv, masks/<series>.npz "
            "(train and test series) "
            "and synth_summary.json. The same preset and seed give the same files. The dataset is written to a "
            "temporary folder next to OUT and renamed at the end; re-running with the same preset and seed "
            "skips the work."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out", metavar="OUT", help="dataset folder to create")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="; ".join(f"{name}: {PRESETS[name].description}" for name in PRESETS),
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes rendering series in parallel"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT even if it is a non-empty folder that is not a synthetic dataset, or regenerate it",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the dataset and print its summary."""
    summary = generate_dataset(
        args.out,
        preset=args.preset,
        seed=args.seed,
        workers=max(1, args.workers),
        force=args.force,
        progress=not args.no_progress,
    )
    print(format_summary(summary))
    if summary.get("skipped"):
        print(f"{args.out}: already holds preset {args.preset} seed {args.seed}; nothing to do (--force regenerates)")
    else:
        print(f"written to {args.out} in {summary['elapsed_s']:.1f} s")
    return 0
