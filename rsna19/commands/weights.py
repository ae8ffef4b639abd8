"""``rsna19 weights list|check|fetch [--pipeline P | NAME...] [--dir D]``: pretrained backbone weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``weights`` subcommand."""
    p = subparsers.add_parser(
        "weights",
        help="list, check or fetch the pretrained backbone weights a pipeline needs (fetch: the only network use)",
        description=(
            "list: each timm backbone the pipeline's models need (model.pretrained: true) with its pretrained tag, "
            "hub repository and the local file, if any. check: offline; verifies every file (sha256 against the one "
            "recorded when fetched, tensor names and shapes against timm's model) and exits 1 if one is missing or "
            "fails. fetch: downloads the missing ones from the Hugging Face hub (HF_ENDPOINT is honoured) into the "
            "Hugging Face cache training reads, or into --dir, which training reads when RSNA19_WEIGHTS_DIR names "
            "it; verifies them and records their sha256 in rsna19_manifest.json. The only command that uses the "
            "network, and only when run."
        ),
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "names", nargs="*", metavar="NAME", help="timm backbones (resnet34, tu-resnet34) instead of a pipeline"
    )
    common.add_argument("--pipeline", metavar="CONFIG", help="pipeline YAML or a name in configs/pipelines/")
    common.add_argument(
        "--dir",
        metavar="D",
        help="a Hugging Face cache folder: searched first; fetch writes there (default: $RSNA19_WEIGHTS_DIR's first "
        "folder, else the Hugging Face cache)",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser("list", parents=[common], help="each backbone, its tag, hub repository and local file")
    check = actions.add_parser("check", parents=[common], help="verify every file offline; 1 if one is missing or bad")
    get = actions.add_parser("fetch", parents=[common], help="download the missing ones (network), verify them")
    for sub in (show, check):
        sub.add_argument("--json", action="store_true", help="print JSON")
    get.add_argument("--force", action="store_true", help="download again even when present")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """List, check or fetch; 1 when a weight is missing or fails verification (check, fetch)."""
    import os

    from rsna19.core.errors import UserError
    from rsna19.nets.pretrained import WEIGHTS_DIR_ENV, hf_cache_dir, weights_dirs
    from rsna19.tools.weights import locate, names_needs, pipeline_needs

    if bool(args.pipeline) == bool(args.names):
        raise UserError("name a pipeline (--pipeline rsna2019) or backbones (resnet34 ...), not both and not neither")
    if args.pipeline:
        from rsna19.pipeline.config import load_pipeline

        needs = pipeline_needs(load_pipeline(args.pipeline))
    else:
        needs = names_needs(args.names)
    target = Path(args.dir).expanduser() if args.dir else (weights_dirs() or [hf_cache_dir()])[0]
    extra = [target] if args.dir else []
    searched = [d.resolve() for d in [*weights_dirs(), hf_cache_dir()]]
    if args.dir and target.resolve() not in searched:
        print(
            f"note: training does not read {target} until {WEIGHTS_DIR_ENV} names it: "
            f"export {WEIGHTS_DIR_ENV}={target}" + (f"{os.pathsep}${WEIGHTS_DIR_ENV}" if weights_dirs() else "")
        )
    if not needs:
        print("no pretrained weights needed (every model trains from scratch)")
        return 0
    statuses = [locate(n, extra) for n in needs]
    if args.action == "list":
        return _list(statuses, args.json)
    if args.action == "check":
        return _check(statuses, args.json)
    return _fetch(statuses, target, args.force)


def _list(statuses: list[Any], as_json: bool) -> int:
    """``rsna19 weights list``: a table (or JSON) of the weights, where each is found or why it is missing."""
    if as_json:
        import json

        print(json.dumps([s.to_dict() for s in statuses], indent=2))
        return 0
    rows = [("backbone", "tag", "hub repo", "models", "local file")]
    for s in statuses:
        rows.append(
            (
                s.need.label,
                s.tag_name or "-",
                s.hf_repo or "-",
                _models(s.need.models),
                str(s.path) if s.path else f"MISSING ({s.problem})",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    return 0


def _check(statuses: list[Any], as_json: bool) -> int:
    """``rsna19 weights check``: verify every weight found; 1 when one is missing or fails."""
    import json

    from rsna19.tools.weights import verify

    for s in statuses:
        verify(s)
    if as_json:
        print(json.dumps([s.to_dict() for s in statuses], indent=2))
    else:
        for s in statuses:
            what = f"ok    {s.need.label}: {s.path} (sha256 {s.sha256})" if not s.problem else ""
            if s.problem:
                where = f" (looked in: {'; '.join(s.searched)})" if s.path is None and s.searched else ""
                what = f"FAIL  {s.need.label}: {s.problem}{where}"
            print(what)
    bad = [s for s in statuses if s.problem]
    if bad and not as_json:
        missing = [s.need.backbone for s in bad if s.path is None and s.need.backbone and not s.need.problem]
        if missing:
            print(f"fetch the missing ones on a machine with network: rsna19 weights fetch {' '.join(missing)}")
    return 1 if bad else 0


def _fetch(statuses: list[Any], target: Path, force: bool) -> int:
    """``rsna19 weights fetch``: download the missing (or, with ``force``, every) weight into ``target``."""
    from rsna19.core.errors import UserError
    from rsna19.tools.weights import fetch, verify

    failed = 0
    for s in statuses:
        if s.need.problem or s.need.file:
            print(f"skip  {s.need.label}: {s.problem or 'an explicit model.weights file, not fetched'}")
            failed += bool(s.problem)
            continue
        if s.path is not None and not force:
            verify(s)
            if not s.problem:
                print(f"ok    {s.need.label}: already present at {s.path}")
                continue
            print(f"FAIL  {s.need.label}: {s.problem}")
            failed += 1
            continue
        try:
            got = fetch(s.need, target, force=force)
        except UserError as exc:
            print(f"FAIL  {exc}")
            failed += 1
            continue
        print(f"fetched {s.need.label}: {got.path} (sha256 {got.sha256}, verified)")
    return 1 if failed else 0


def _models(models: tuple[str, ...]) -> str:
    """The models needing a weight, shortened for a table column (``a +5 more``)."""
    if not models:
        return "-"
    return models[0] if len(models) == 1 else f"{models[0]} +{len(models) - 1} more"
