"""``rsna19 models``: list the registered model families and their traits."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the registered models (name, family, input, reads, pretrained, description)",
        description="List every model a config can name in `model.name` (plugins of $RSNA19_PLUGINS included): its "
        "family, the input layout its dataset must produce (channels, stack, slab, sequence), what it reads besides "
        "(subtype masks, another run's embeddings), where its pretrained weights come from (timm, smp, none) and a "
        "one-line description.",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rsna19.nets import list_models

    rows = [("name", "family", "input", "reads", "pretrained", "description")]
    for s in list_models():
        reads = "embeddings" if s.reads_embeddings else "images+masks" if s.masks else "images"
        description = s.description + (f" [plugin {s.plugin}]" if s.plugin else "")
        rows.append((s.name, s.family, s.input_layout, reads, s.pretrained or "none", description))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5])
    return 0
