"""Thin script: `python models/train.py ...` is `rsna19 train ...`."""

import sys

from rsna19.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
