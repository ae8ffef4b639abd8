"""Build and save the level-2 features of a stack config (``rsna19.stacking.run.write_features``).

Usage: python second_level/build_features.py configs/stack/demo.yaml [key=value ...] [--runs DIR] [--features-out DIR]
"""

from __future__ import annotations

import argparse
import sys

from rsna19.commands.stack import add_arguments, config_from_args
from rsna19.core.errors import UserError
from rsna19.stacking.run import write_features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--features-out", help="folder for features_{oof,test}.parquet (default OUT/<name>-features)")
    args = parser.parse_args(argv)
    try:
        out = write_features(config_from_args(args), args.features_out)
    except UserError as exc:
        print(f"build_features: error: {exc}", file=sys.stderr)
        return 1
    print(f"features written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
