"""``rsna19 validate DATA --bundle B --labels CSV --out OUT [--format studies|cq500]``: a bundle checked on a site's
labelled studies or on CQ500, reported like the literature reports it."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``validate`` subcommand."""
    p = subparsers.add_parser(
        "validate",
        help="check a bundle on a site's labelled studies or on CQ500: AUC, sens/spec with intervals, calibration",
        description=(
            "Predict every study in DATA exactly like predict-study (series choice, thin-series reformatting, every "
            "encoding) and compare the calibrated study results with the reference: --format studies: a csv with "
            "study_uid (StudyInstanceUID) and any of any, epidural, intraparenchymal, intraventricular, "
            "subarachnoid, subdural (0/1), DATA a folder (any layout) or zip; --format cq500: DATA the CQ500 folders "
            "as distributed and CSV its reads.csv (reference: the majority of readers R1-R3 per finding; study key "
            "CQ500-CT-<n> from the folder name). Per class: positive / negative studies, AUC with a bootstrap 95 % "
            "interval, sensitivity and specificity (Wilson 95 % intervals) at the bundle's operating point and at "
            "the thresholds giving 0.90 / 0.95 sensitivity and specificity on these studies, Brier score and "
            "calibration error; Fleiss' kappa of the readers (cq500). Writes OUT/studies.csv, validation.csv, "
            "validation.json, report.png, table.md (laid out like the published CQ500 table), summary.txt and the "
            "predict-study outputs in OUT/predict/. Unreadable studies, missing reads, studies in the labels but "
            "not in DATA and the reverse are listed and counted. --recalibrate refits the study calibration and "
            "operating points on these studies (cross-validated numbers reported) and writes a new bundle."
        ),
    )
    p.add_argument("data", help="folder or .zip of studies (cq500: the CQ500 study folders)")
    p.add_argument("--bundle", required=True, help="bundle folder written by `rsna19 bundle` (with a study model)")
    p.add_argument("--labels", required=True, help="study labels csv (studies) or CQ500 reads.csv (cq500)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", dest="fmt", default="studies", choices=("studies", "cq500"), help="labels format")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the intervals (2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and the recalibration folds (0)")
    p.add_argument("--bins", type=int, default=10, help="equal-width bins of the calibration error (10)")
    p.add_argument(
        "--recalibrate",
        nargs="?",
        const="",
        default=None,
        metavar="NEW_BUNDLE",
        help="refit the study calibration and operating points on these studies and write a new bundle "
        "(default OUT/bundle_recalibrated; without NEW_BUNDLE, put the option after DATA); the numbers reported for "
        "it are cross-validated",
    )
    p.add_argument("--cv-folds", type=int, default=5, help="folds of the recalibration's cross-validation (5)")
    p.add_argument("--force", action="store_true", help="replace an existing recalibrated bundle")
    p.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"), help="where the models run")
    p.add_argument("--folds", default=None, help="bundled folds to run, e.g. 0,1 (default: all)")
    p.add_argument("--tta", default=None, help="test-time views instead of the bundle's, e.g. none")
    p.add_argument("--workers", type=int, default=1, help="processes reading DICOM headers (1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Validate and print the summary and the table."""
    from pathlib import Path

    from rsna19.study.bundle import parse_folds
    from rsna19.study.predictor import StudyOptions, StudyPredictor
    from rsna19.validation.run import ValidateOptions, validate

    recal = None
    if args.recalibrate is not None:
        recal = args.recalibrate or str(Path(args.out) / "bundle_recalibrated")
    options = ValidateOptions(
        fmt=args.fmt,
        n_boot=args.bootstrap,
        seed=args.seed,
        n_bins=args.bins,
        recalibrate=recal,
        cv_folds=args.cv_folds,
        force=args.force,
    )
    options.check()  # before the bundle is loaded
    predictor = StudyPredictor.load(
        args.bundle,
        device=args.device,
        folds=parse_folds(args.folds),
        tta=[t.strip() for t in args.tta.split(",") if t.strip()] if args.tta is not None else None,
        options=StudyOptions(cam=False),
    )
    info = validate(args.data, predictor, args.labels, args.out, options=options, workers=args.workers)
    print(info["summary"], end="")
    print((Path(args.out) / "table.md").read_text(), end="")
    print(f"validate: studies.csv, validation.csv, validation.json, report.png, table.md, summary.txt in {args.out}")
    return 0
