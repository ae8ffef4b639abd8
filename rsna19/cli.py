"""The ``rsna19`` command line.

Each subcommand lives in its own module under :mod:`rsna19.commands` and exposes ``register(subparsers)``,
which adds an ``argparse`` sub-parser whose ``func`` default is called with the parsed namespace. Modules
are discovered, so a new stage adds a file and never edits this one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

import rsna19
from rsna19 import commands
from rsna19.core.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every discovered subcommand."""
    parser = argparse.ArgumentParser(
        prog="rsna19",
        description=(
            "Intracranial hemorrhage detection on head CT. Stages: synth → index → convert → folds → "
            "train → predict → stack → submit; `rsna19 demo` runs them all on synthetic data."
        ),
    )
    parser.add_argument("--version", action="version", version=f"rsna19 {rsna19.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rsna19`` console script; returns the process exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may follow options (`rsna19 stack CONFIG --force lgbm.num_threads=4`); argparse only
    # takes a positional list before them, so the leftovers join the command's `overrides`.
    if (
        extra
        and isinstance(getattr(args, "overrides", None), list)
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as exc:  # expected, explained failures: no traceback
        print(f"rsna19 {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
