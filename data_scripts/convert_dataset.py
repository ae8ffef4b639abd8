"""Convert every series of an index into the HU cache (same as ``rsna19 convert``).

Example:
    python data_scripts/convert_dataset.py data/index.parquet --out data/cache --workers 8
"""

from __future__ import annotations

import argparse
import logging
import sys

from rsna19.commands.convert import add_arguments, run
from rsna19.core.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the convert stage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(parser.parse_args(argv))
    except UserError as exc:
        print(f"convert_dataset: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
