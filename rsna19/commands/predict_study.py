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
            "series, keep the axial CT ones, convert them exactly like the training data, run every bundled model "
            "and the stacker, and write OUT/slices.csv, OUT/studies.json and OUT/report_<study>.png. A study that "
            "fails is reported in studies.json; the others are still processed."
        ),
    )
    p.add_argument("path", help="folder or .zip of DICOM files")
    p.add_argument("--bundle", required=True, help="bundle folder written by `rsna19 bundle`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where the models run (cpu)")
    p.add_argument("--workers", type=int, default=1, help="processes reading DICOM headers (1)")
    p.add_argument("--top-k", type=int, default=6, help="slices in each report (6)")
    p.add_argument("--threshold", type=float, default=0.5, help="decision threshold (0.5)")
    p.add_argument("--no-cam", dest="cam", action="store_false", help="no Grad-CAM overlay on the report")
    p.add_argument(
        "--dicom-out",
        metavar="DIR",
        help="also write, per study, a DICOM Structured Report (TID 1500: calibrated probabilities, flags, operating "
        "points, the slices that drove them) and a Secondary Capture of the report picture, in the source study",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Predict; exit code 1 when no study could be predicted."""
    from rsna19.inference.study import predict_studies

    summary = predict_studies(
        args.path,
        args.bundle,
        args.out,
        device=args.device,
        workers=args.workers,
        top_k=args.top_k,
        threshold=args.threshold,
        cam=args.cam,
        dicom_out=args.dicom_out,
    )
    print(
        f"predict-study: {summary['n_ok']} of {summary['n_studies']} studies predicted in {summary['total_s']:.1f} s "
        f"(bundle loaded in {summary['bundle_load_s']:.1f} s); outputs in {args.out}"
    )
    return 0 if summary["n_ok"] > 0 else 1
