"""``rsna19 run --data DIR --out WORK --pipeline CONFIG``: every stage on one RSNA-layout folder."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` subcommand."""
    p = subparsers.add_parser(
        "run",
        help="run the whole pipeline on an RSNA-layout folder (index → … → submission), skipping what is done",
        description=(
            "Run index → convert → folds → every base model × fold (train, OOF, test) → stack → submission on DIR "
            "(stage_2_train/, stage_2_train.csv, stage_2_test/; stage_1 names accepted), into WORK. Finished stages "
            "are skipped, so a killed run resumes. Writes WORK/submission.csv, WORK/scores.csv (the stack's) and "
            "prints per-model and stacked scores and the time of each stage; with DIR/test_labels.csv the "
            "submission is scored too."
        ),
    )
    p.add_argument("--data", required=True, metavar="DIR", help="RSNA-layout data folder")
    p.add_argument("--out", required=True, metavar="WORK", help="work folder (created)")
    p.add_argument(
        "--pipeline",
        required=True,
        metavar="CONFIG",
        help="pipeline YAML, or a name in configs/pipelines/ (tiny, demo, rsna2019)",
    )
    p.add_argument(
        "--print-jobs",
        action="store_true",
        help="print the job graph as shell commands (one block per job: what it waits for, its GPU), run nothing",
    )
    p.add_argument(
        "--executor",
        choices=("local", "slurm"),
        default="local",
        help="local: this machine, `jobs` model jobs at a time; slurm: every job a SLURM batch job chained with "
        "afterok (resources from the pipeline's `slurm:` section); either way finished jobs are skipped",
    )
    p.add_argument("--no-preflight", action="store_true", help="skip the `rsna19 doctor` checks before the first stage")
    p.add_argument("--progress", action="store_true", help="show the stages' own progress bars and logs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pipeline overrides, e.g. n_folds=3 device=cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the pipeline (or print its jobs) and print the final table."""
    from rsna19.pipeline.config import load_pipeline

    cfg = load_pipeline(args.pipeline, args.overrides)
    if args.print_jobs:
        from rsna19.pipeline.jobs import pipeline_jobs

        print("\n".join(pipeline_jobs(args.data, args.out, cfg, args.pipeline)))
        return 0
    from rsna19.pipeline.run import format_result, quiet_logs, run_pipeline

    with quiet_logs(not (args.progress or args.verbose)):
        result = run_pipeline(
            args.data,
            args.out,
            cfg,
            progress=args.progress,
            executor=args.executor,
            preflight=not args.no_preflight,
        )
    print(format_result(result))
    print(f"outputs: {result.submission}, {result.work / 'scores.csv'}")
    return 0
