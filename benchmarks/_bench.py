"""What every benchmark script shares: ``--quick`` (small sizes, seconds) and ``--json OUT`` (machine-readable rows).

``benchmarks/run_all.py`` runs each script several times with ``--json`` and turns the medians of the rows into the
tables of ``docs/benchmarks.md``. The JSON holds one object::

    {"name": "index", "title": "...", "goal": "...", "met": true | false | null,
     "params": {...}, "rows": [{"case": "index w1", "value": 7396.0, "unit": "files/s"}, ...]}
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--quick`` and ``--json``."""
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds): proves the script runs")
    parser.add_argument("--json", metavar="OUT", help="also write the rows as JSON to OUT (for run_all.py)")


def apply_quick(args: argparse.Namespace, **small: Any) -> None:
    """With ``--quick``, replace the size options by ``small`` (name → value)."""
    if args.quick:
        for key, value in small.items():
            setattr(args, key, value)


def write_json(
    args: argparse.Namespace,
    name: str,
    title: str,
    goal: str,
    rows: list[dict[str, Any]],
    met: bool | None = None,
    params: dict[str, Any] | None = None,
) -> None:
    """Write the rows to ``args.json`` when given (nothing otherwise)."""
    if not args.json:
        return
    payload = {"name": name, "title": title, "goal": goal, "met": met, "params": params or {}, "rows": rows}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=float), encoding="utf-8")
    os.replace(tmp, path)
