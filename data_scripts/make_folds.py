"""Thin script: `python data_scripts/make_folds.py INDEX --out folds.csv` is `rsna19 folds ...`."""

import sys

from rsna19.cli import main

if __name__ == "__main__":
    sys.exit(main(["folds", *sys.argv[1:]]))
