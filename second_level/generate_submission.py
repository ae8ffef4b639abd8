"""Kaggle csv from a finished stack: the same as ``rsna19 submit STACK_DIR --out submission.csv [--which blend]``."""

from __future__ import annotations

import sys

from rsna19.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
