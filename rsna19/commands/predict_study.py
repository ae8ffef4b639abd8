"""``rsna19 predict-study PATH --bundle BUNDLE --out OUT``: predict new head-CT studies with a bundle."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``predict-study`` subcommand."""
    p = subparsers.add_parser(
        "predict-study",
        help="predict the studies in a folder or zip of DICOMs with a bundle (csv, json, report png)",
        description=(
            "Group the DICOM files under PATH (a folder, nested, studies mixed, stray files ignored; or a zip) into "
            "series, keep the readable axial CT ones and rank them per study (original/primary axials, soft-tissue "
            "kernel over bone, slice spacing nearest the training one, head coverage and field of view; "
            "localizers, projections, other body parts, contrast/CTA and perfusion series are skipped, and a "
            "duplicate of a better series, e.g. a copy in another transfer syntax, is predicted once), predict the "
            "best one (--all-series: every usable one), convert it exactly like the training data (a series much "
            "thinner than the training slices is averaged into slabs of the training spacing, and every input "
            "slice gets its slab's probabilities), run every bundled model and the stacker, and write "
            "OUT/slices.csv, OUT/models.csv, OUT/studies.json (every series choice with its reason, per-series "
            "timings, the calibrated study result at the bundle's operating points, the bundle's checksum) and "
            "OUT/report_<study>.png. Every common transfer syntax is read (uncompressed, deflate, RLE, JPEG "
            "baseline/extended/lossless, JPEG-LS, JPEG 2000) and a multi-frame Enhanced CT file is read frame by "
            "frame. A study that fails is reported in studies.json; the others are still processed."
        ),
    )
    p.add_argument("path", help="folder or .zip of DICOM files")
    p.add_argument("--bundle", required=True, help="bundle folder written by `rsna19 bundle`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--device",
        default="auto",
        choices=("cpu", "cuda", "auto"),
        help="where the models run (auto: the GPU when one is visible, else the CPU)",
    )
    p.add_argument(
        "--folds",
        default=None,
        help="bundled folds to run, e.g. 0,1 (default: all); fewer folds, proportionally less model time",
    )
    p.add_argument(
        "--tta",
        default=None,
        help="test-time views instead of the bundle's, e.g. none or none,hflip (default: the bundle's)",
    )
    p.add_argument(
        "--all-series",
        action="store_true",
        help="predict every usable series of a study (bone kernels excepted), not only the best ranked one",
    )
    p.add_argument(
        "--include-contrast",
        action="store_true",
        help="also predict contrast, CTA and dynamic/perfusion series (skipped by default)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes reading DICOM headers (1)")
    p.add_argument("--top-k", type=int, default=6, help="slices in each report (6)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="threshold of the uncalibrated slice-maximum flags (`prediction.positive`) and of the report's "
        "curves (0.5); the calibrated study flags use the bundle's operating points",
    )
    p.add_argument("--no-cam", dest="cam", action="store_false", help="no Grad-CAM overlay on the report")
    p.add_argument(
        "--dicom-out",
        metavar="DIR",
        help="also write, per study, a DICOM Structured Report (TID 1500: calibrated probabilities, flags, operating "
        "points, the slices that drove them, the bundle's checksum and version) and a Secondary Capture of the "
        "report picture, both in the source study (new series; file names are the new UIDs, no patient data), and "
        "for a positive study its bleed map as a DICOM Segmentation (SEG, highdicom)",
    )
    p.add_argument(
        "--no-seg",
        dest="seg",
        action="store_false",
        help="with --dicom-out: no DICOM SEG bleed map (the report keeps the Grad-CAM overlay)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Predict; exit code 1 when no study could be predicted."""
    from rsna19.study.batch import predict_studies
    from rsna19.study.bundle import parse_folds
    from rsna19.study.predictor import StudyOptions, StudyPredictor

    options = StudyOptions(
        top_k=args.top_k,
        threshold=args.threshold,
        cam=args.cam,
        all_series=args.all_series,
        include_contrast=args.include_contrast,
        source_headers=args.dicom_out is not None,
        seg=args.seg and args.dicom_out is not None,
    )
    predictor = StudyPredictor.load(
        args.bundle,
        device=args.device,
        folds=parse_folds(args.folds),
        tta=[t.strip() for t in args.tta.split(",") if t.strip()] if args.tta is not None else None,
        options=options,
    )
    summary = predict_studies(args.path, predictor, args.out, workers=args.workers, dicom_out=args.dicom_out).summary
    print(
        f"predict-study: {summary['n_ok']} of {summary['n_studies']} studies predicted in {summary['total_s']:.1f} s "
        f"(bundle loaded in {summary['bundle_load_s']:.1f} s)"
        + (f", {summary['n_not_assessable']} not assessable" if summary.get("n_not_assessable") else "")
        + f"; outputs in {args.out}"
    )
    return 0 if summary["n_ok"] + summary.get("n_not_assessable", 0) > 0 else 1
