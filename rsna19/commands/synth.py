"""``rsna19 synth OUT --preset tiny|demo|context|...``: write a synthetic dataset in the RSNA layout; ``--preset
cq500``: a CQ500-shaped one (:mod:`rsna19.synth.cq500`) for ``rsna19 validate --format cq500``."""

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
            "skips the work. --preset cq500 writes a CQ500-shaped dataset instead (one folder a study, 'CQ500CT<i> "
            "CQ500CT<i>/Unknown Study/' with the series 'CT 5mm', 'CT BONE' and 'CT PLAIN THIN', and reads.csv with "
            "three readers R1-R3 who disagree on a few studies), for `rsna19 validate --format cq500`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out", metavar="OUT", help="dataset folder to create")
    parser.add_argument(
        "--preset",
        choices=[*sorted(PRESETS), "cq500"],
        default="tiny",
        help="; ".join(f"{name}: {PRESETS[name].description}" for name in PRESETS)
        + "; cq500: a CQ500-shaped dataset (--studies studies of --image-size pixels)",
    )
    parser.add_argument("--studies", type=int, default=40, help="studies of the cq500 preset")
    parser.add_argument(
        "--image-size", type=int, default=256, help="rows = columns of the cq500 preset (256: the demo bundle's)"
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
    workers = max(1, args.workers)
    if args.preset == "cq500":
        from rsna19.synth.cq500 import format_cq500_summary, generate_cq500

        summary = generate_cq500(
            args.out, args.studies, args.seed, image_size=args.image_size, workers=workers, force=args.force
        )
        text, what = format_cq500_summary(summary), "this cq500 dataset"
    else:
        summary = generate_dataset(
            args.out,
            preset=args.preset,
            seed=args.seed,
            workers=workers,
            force=args.force,
            progress=not args.no_progress,
        )
        text, what = format_summary(summary), f"preset {args.preset} seed {args.seed}"
    print(text)
    if summary.get("skipped"):
        print(f"{args.out}: already holds {what}; nothing to do (--force regenerates)")
    else:
        print(f"written to {args.out} in {summary['elapsed_s']:.1f} s")
    return 0
