"""Build the slice index (same as ``rsna19 index``).

Usage: python data_scripts/create_dataframe.py DIR... [--labels CSV] --out index.parquet [--workers N]
"""

from __future__ import annotations

import sys

from rsna19.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
