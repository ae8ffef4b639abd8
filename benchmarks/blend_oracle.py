"""How much any convex blend of a run's stackers and base models could gain over the best base model.

For each finished demo folder, the stack of ``DIR/stack/<name>/config.yaml`` is recomputed in a temporary folder
(seconds at demo size) and three blends of the same members (every stacker, the plain mean and every base model)
are scored against the best base model on each split:

* **actual**: the blend ``rsna19 stack`` reports (weights cross-fitted over the level-2 folds for OOF, fitted on
  all OOF rows for test);
* **oracle**: convex weights fitted *in sample*, on the very rows they are scored on (all OOF rows for the OOF
  column, the test labels for the test column), one vector shared by the classes and one per class.

The oracle is optimistic by construction (it peeks at the labels it is scored on), so a ratio above a goal in the
oracle columns means that no convex blend of these members reaches the goal on that split: the members, not the
blending, are the limit. Used for the "Model quality" section of ``docs/benchmarks.md``.

Usage:
    python benchmarks/blend_oracle.py DIR [DIR ...] [--stack demo]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from rsna19.core.config import load_config
from rsna19.core.metrics import weighted_log_loss
from rsna19.stacking.config import StackConfig
from rsna19.stacking.convex import combine, fit_convex_weights
from rsna19.stacking.run import run_stack


def oracle_ratio(members: np.ndarray, y: np.ndarray, best: float, per_class: bool) -> float:
    """Loss of the in-sample convex blend of ``members`` (N, K, 6) against labels ``y`` (N, 6), over ``best``."""
    return weighted_log_loss(y, combine(members, fit_convex_weights(members, y, per_class))) / best


def analyse(work: Path, stack_name: str) -> dict[str, float | str]:
    """The ratios of one finished demo folder (see the module docstring)."""
    cfg = load_config(StackConfig, work / "stack" / stack_name / "config.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_stack(dataclasses.replace(cfg, out=tmp))
    l2 = result.level2
    if l2 is None or l2.y_test is None:
        raise SystemExit(f"{work}: the stack has no test labels; the oracle needs them")
    base_oof = l2.oof.base.astype(np.float64)  # (N, M, 6)
    base_test = l2.test.base.astype(np.float64)
    best_oof = min(weighted_log_loss(l2.y, base_oof[:, i]) for i in range(base_oof.shape[1]))
    best_test = min(weighted_log_loss(l2.y_test, base_test[:, i]) for i in range(base_test.shape[1]))
    names = [n for n in result.oof if n != "blend"]
    oof = np.concatenate([np.stack([result.oof[n] for n in names], 1), base_oof], 1)
    test = np.concatenate([np.stack([result.test[n] for n in names], 1), base_test], 1)
    return {
        "run": work.name,
        "best_oof": best_oof,
        "best_test": best_test,
        "actual_oof": weighted_log_loss(l2.y, result.oof["blend"]) / best_oof,
        "actual_test": weighted_log_loss(l2.y_test, result.test["blend"]) / best_test,
        "oracle_oof": oracle_ratio(oof, l2.y, best_oof, per_class=False),
        "oracle_test": oracle_ratio(test, l2.y_test, best_test, per_class=False),
        "oracle_pc_oof": oracle_ratio(oof, l2.y, best_oof, per_class=True),
        "oracle_pc_test": oracle_ratio(test, l2.y_test, best_test, per_class=True),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="finished `rsna19 demo` output folders")
    parser.add_argument("--stack", default="demo", help="the stack name under DIR/stack/ (default demo)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(
        "| run | best base OOF | best base test | blend / best, OOF | test | oracle (shared) OOF | test "
        "| oracle (per class) OOF | test |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for work in args.dirs:
        r = analyse(work, args.stack)
        print(
            f"| {r['run']} | {r['best_oof']:.4f} | {r['best_test']:.4f} | {r['actual_oof']:.3f} | "
            f"{r['actual_test']:.3f} | {r['oracle_oof']:.3f} | {r['oracle_test']:.3f} | {r['oracle_pc_oof']:.3f} | "
            f"{r['oracle_pc_test']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
