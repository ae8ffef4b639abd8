"""``rsna19 doctor [--pipeline P] [--work DIR] [--data DIR] [--json]``: is this machine ready for a pipeline?"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``doctor`` subcommand."""
    p = subparsers.add_parser(
        "doctor",
        help="check this machine for a pipeline: Python, torch/CUDA, driver, GPUs, disk, RAM, DICOM decoders, weights",
        description=(
            "Check Python, torch and its CUDA build, the NVIDIA driver, each GPU (memory, compute capability, native "
            "bf16), free disk at the work folder against the cache the data needs, RAM, the pydicom decoders of the "
            "common transfer syntaxes and, with --pipeline, whether every pretrained weight its models need is "
            "present locally. Each check is ok, warn or fail with what to do; exits 1 when one fails. `rsna19 run` "
            "runs the same checks before its first stage (--no-preflight skips them). Uses no network."
        ),
    )
    p.add_argument("--pipeline", metavar="CONFIG", help="pipeline YAML or a name in configs/pipelines/")
    p.add_argument("--work", metavar="WORK", help="work folder of `rsna19 run --out` (disk check; default: here)")
    p.add_argument("--data", metavar="DIR", help="RSNA-layout data folder: estimate the cache from its DICOM files")
    p.add_argument("--index", metavar="PARQUET", help="index.parquet: estimate the cache and list its syntaxes")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the checks, print the report; 1 when a check failed."""
    import json

    from rsna19.tools.doctor import run_checks

    cfg = None
    if args.pipeline:
        from rsna19.pipeline.config import load_pipeline

        cfg = load_pipeline(args.pipeline)
    report = run_checks(cfg, args.work, args.data, args.index)
    if args.json:
        out = report.to_dict()
        out["pipeline"] = args.pipeline
        print(json.dumps(out, indent=2))
    else:
        print(report.format())
    return report.exit_code
