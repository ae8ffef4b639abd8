"""``rsna19 convert INDEX --out CACHE``: every series of the index into the HU cache."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The convert options (shared with data_scripts/convert_dataset.py)."""
    parser.add_argument("index", help="index.parquet written by `rsna19 index` (or the folder holding it)")
    parser.add_argument("--out", required=True, help="cache folder (created)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--crop", type=int, default=400, help="output window side in pixels, 0 = no crop (400)")
    parser.add_argument("--spacing", type=float, default=None, help="resample in-plane to this spacing (mm) first")
    parser.add_argument("--no-tilt-correction", dest="correct_tilt", action="store_false", help="keep gantry shear")
    parser.add_argument("--force", action="store_true", help="reconvert every series, also up-to-date ones")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the stage; exit code 0 (failed series are listed in convert_errors.csv, not fatal)."""
    from rsna19.conversion.run import run_convert

    summary = run_convert(
        args.index,
        args.out,
        workers=args.workers,
        crop=args.crop or None,
        spacing=args.spacing,
        correct_tilt=args.correct_tilt,
        force=args.force,
        progress=args.progress,
    )
    print(
        f"convert: {summary.n_series} series: {summary.converted} converted, {summary.skipped} up to date, "
        f"{summary.failed} failed; {summary.n_slices} slices written, {summary.dropped_slices} dropped; "
        f"errors in {args.out}/convert_errors.csv"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` subcommand."""
    parser = subparsers.add_parser(
        "convert",
        help="DICOM series → cropped int16 HU volumes (cache)",
        description="Convert every series of an index into CACHE/<series>/{volume.npy,meta.json,preview.png}.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)
