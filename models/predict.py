"""Thin script: `python models/predict.py ...` is `rsna19 predict ...`."""

import sys

from rsna19.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]]))
