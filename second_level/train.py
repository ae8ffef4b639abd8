"""Train the second level of a stack config: the same as ``rsna19 stack CONFIG [key=value ...]``."""

from __future__ import annotations

import sys

from rsna19.cli import main

if __name__ == "__main__":
    sys.exit(main(["stack", *sys.argv[1:]]))
