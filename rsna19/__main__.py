"""``python -m rsna19`` (what ``torchrun -m rsna19 train ...`` starts): the ``rsna19`` command line."""

import sys

from rsna19.cli import main

if __name__ == "__main__":
    sys.exit(main())
