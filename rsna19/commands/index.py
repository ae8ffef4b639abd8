"""``rsna19 index DIR... [--labels CSV] --out index.parquet [--workers N]``: build the slice index."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``index`` subcommand."""
    p = subparsers.add_parser(
        "index",
        help="read DICOM headers into index.parquet (+ index_errors.csv)",
        description=(
            "Read the headers of every file under DIR... (recursively) into one row a usable CT slice. "
            "Unusable files (not DICOM, truncated, not CT, no pixels, no position, wrong pixel buffer size) "
            "go to index_errors.csv next to the output with a one-line reason. A file is train if it lies "
            "under a folder named stage_*_train* or its SOP has labels, test otherwise."
        ),
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders to search (or single files)")
    p.add_argument("--labels", metavar="CSV", help="label csv in the ID,Label format (stage_2_train.csv)")
    p.add_argument("--out", required=True, metavar="PARQUET", help="output index parquet")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="processes (default: all CPUs)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if the output exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the index; the summary goes to the log."""
    from rsna19.io.index import build_index, errors_path

    df = build_index(
        args.dirs,
        labels_csv=args.labels,
        out=args.out,
        workers=args.workers,
        progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    print(f"{len(df)} slices in {df['series_uid'].nunique()} series -> {args.out} (errors: {errors_path(args.out)})")
    return 0
