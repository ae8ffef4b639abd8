"""``rsna19 bundle WORK --out BUNDLE``: the inference bundle of a finished ``rsna19 run`` (no pickles)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``bundle`` subcommand."""
    p = subparsers.add_parser(
        "bundle",
        help="export the trained models + stacker of a `rsna19 run` folder for predict-study",
        description=(
            "Write BUNDLE/: each base model's fold weights as safetensors with their resolved configs, the stacker "
            "(LightGBM text dumps, MLP safetensors + JSON scaler, convex / blend weights as JSON) and bundle.json "
            "(versions, classes, windows, conversion crop, TTA, checksums) and study_model.json (study-level "
            "calibration and operating points fitted on the OOF studies). Loading never unpickles anything."
        ),
    )
    p.add_argument("work", help="work folder of a finished `rsna19 run` / `rsna19 demo`")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--models", nargs="+", help="base models to include (default: all of the pipeline)")
    p.add_argument("--folds", nargs="+", type=int, help="folds to include (default: all)")
    p.add_argument("--which", help="stack method: blend, lgbm, mlp, convex, mean (default: the pipeline's submit)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    add_study_model_arguments(p)
    p.set_defaults(func=run)


def add_study_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--sensitivity`` and ``--study-score`` of a study model fitted here (``bundle``, ``evaluate``)."""
    p.add_argument(
        "--sensitivity",
        nargs="+",
        metavar="[CLASS=]S",
        help="target sensitivity of the study-level operating points: 0.9 (every class) and/or any=0.95 "
        "subdural=0.9 ... (default 0.95 each); the point is the ceil(S*(N+1))-th highest of the N positive OOF "
        "studies, so a new positive study passes it with probability >= S",
    )
    p.add_argument(
        "--study-score",
        default="max",
        choices=("max", "top3_mean"),
        help="study score calibrated into the study probability: the max slice probability or the mean of the "
        "three highest (max)",
    )


def study_model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``sensitivity`` and ``study_score`` keywords of the options of :func:`add_study_model_arguments`."""
    from rsna19.core.calibration import parse_sensitivity
    from rsna19.core.errors import UserError

    try:
        return {"sensitivity": parse_sensitivity(args.sensitivity), "study_score": args.study_score}
    except ValueError as exc:
        raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Export and print what went in."""
    from rsna19.study.bundle import export_bundle

    options = study_model_options(args)
    res = export_bundle(args.work, args.out, args.models, args.folds, args.which, force=args.force, **options)
    print(f"bundle: {', '.join(res.models)} × folds {res.folds} + stacker -> {res.path}")
    if res.study_model is not None:
        print("study operating points (sensitivity / specificity on the OOF studies):")
        for c, e in res.study_model["classes"].items():
            sens, spec = e["oof_sensitivity"], e["oof_specificity"]
            print(
                f"  {c:17s} p >= {e['threshold']:.4f}  target {e['target_sensitivity']:.2f}  "
                f"sens {'n/a' if sens is None else f'{sens:.3f}'}  spec {'n/a' if spec is None else f'{spec:.3f}'}"
            )
    return 0
