"""Write a synthetic RSNA-format dataset (thin wrapper over :func:`rsna19.synth.generate_dataset`).

Usage:
    python data_scripts/make_synthetic.py OUT [--preset tiny|demo] [--seed N] [--workers N] [--force]
"""

from __future__ import annotations

import sys

from rsna19.cli import main

if __name__ == "__main__":
    sys.exit(main(["synth", *sys.argv[1:]]))
