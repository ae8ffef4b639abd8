"""What :func:`json.dumps` needs to write the numbers and paths the pipeline's summaries hold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def json_default(obj: Any) -> Any:
    """``default=`` for :func:`json.dumps`: numpy scalars as Python numbers, paths as strings.

    Raises:
        TypeError: anything else (as :func:`json.dumps` would).
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
