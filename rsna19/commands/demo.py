"""``rsna19 demo [--out DIR]``: synthetic data + the demo pipeline (2D + sequence model, 2 folds, stackers), scored."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="the whole pipeline on synthetic data on a CPU (what `make demo` runs)",
        description=(
            "Generate the `demo` synthetic dataset into OUT/data (80 train + 20 test studies) and run "
            "configs/pipelines/demo.yaml on it: the 2D model and the sequence model on its embeddings × 2 folds, "
            "LightGBM / MLP / convex stackers and their blend, in under 10 minutes on two CPU cores; prints each "
            "model's and the stack's OOF and test weighted log loss. `--pipeline demo_full` runs five families "
            "(2D, 2.5D, 3D-slab, segmentation-aided, sequence) × 3 folds: under 10 minutes only where the CPU "
            "trains in bf16, ~30 minutes elsewhere. Re-running skips what is done."
        ),
    )
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument(
        "--pipeline",
        default="demo",
        help="pipeline config (default configs/pipelines/demo.yaml; demo_full: the five families)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    p.add_argument(
        "--preset",
        default="demo",
        help="synthetic preset (default demo; demo60: 60 training studies, for checking the second level on a "
        "second dataset; see `rsna19 synth --help`)",
    )
    p.add_argument("--progress", action="store_true", help="show the stages' own progress bars and logs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline overrides")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print the score table."""
    from rsna19.pipeline.demo import run_demo
    from rsna19.pipeline.run import format_result, quiet_logs

    with quiet_logs(not (args.progress or args.verbose)):
        result, seconds = run_demo(
            args.out, args.pipeline, args.overrides, seed=args.seed, preset=args.preset, progress=args.progress
        )
    print(format_result(result))
    print(f"demo finished in {seconds / 60:.1f} min; outputs in {args.out}")
    return 0
