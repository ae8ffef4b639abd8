"""``rsna19 models``: list the registered model families."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the registered models (name, family, input, description)",
        description="List every model a config can name in `model.name`: its family, the input layout its dataset "
        "must produce (channels, stack, slab, sequence) and a one-line description.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rsna19.nets import list_models

    specs = list_models()
    rows = [("name", "family", "input", "description")]
    rows += [(s.name, s.family, s.input_layout, s.description) for s in specs]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0
