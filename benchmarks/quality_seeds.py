"""Model quality over seeds and datasets: one ``rsna19 demo`` per (preset, seed), then one table per run.

Each table row is a base model, their mean, a stacker or the blend, with the OOF and test weighted log loss and
the AUC of ``any`` per slice and per study (from the stack's ``scores.csv``), followed by the blend's loss as a
fraction of the best base model's (OOF and test, each against the best base model on that split). The last
table summarises every run on one line. Used for the "Model quality" section of ``docs/benchmarks.md``.

Usage:
    python benchmarks/quality_seeds.py --root DIR --runs demo:0 demo:1 demo:2 demo60:1 demo60:2 demo60:3
    python benchmarks/quality_seeds.py --root DIR --runs demo:0 --no-run   # tables of finished runs only

A run is ``DIR/<preset>_s<seed>``; finished runs are reused (``rsna19 demo`` skips what is done).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

COLUMNS = [
    ("wll_oof", "OOF wll"),
    ("wll_test", "test wll"),
    ("auc_any", "slice AUC OOF"),
    ("auc_any_test", "slice AUC test"),
    ("study_auc_oof", "study AUC OOF"),
    ("study_auc_test", "study AUC test"),
]


def run_demo(out: Path, preset: str, seed: int) -> float:
    """Run ``rsna19 demo`` into ``out``; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "rsna19", "demo", "--out", str(out), "--preset", preset, "--seed", str(seed)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def scores_of(out: Path) -> pd.DataFrame:
    """The stack's ``scores.csv`` of a finished demo folder."""
    found = sorted(out.glob("stack/*/scores.csv"))
    if not found:
        raise SystemExit(f"{out}: no stack/*/scores.csv (the run did not finish)")
    return pd.read_csv(found[0])


def ratios(scores: pd.DataFrame) -> dict[str, float]:
    """Blend loss / best base loss, on OOF and on test (each against the best base model on that split)."""
    base, blend = scores[scores["kind"] == "base"], scores[scores["kind"] == "blend"]
    out = {}
    for col in ("wll_oof", "wll_test"):
        if blend.empty or base[col].dropna().empty:
            out[col] = math.nan
        else:
            out[col] = float(blend[col].iloc[0] / base[col].min())
    return out


def fmt(v: object) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.4f}"


def table(scores: pd.DataFrame) -> str:
    """A markdown table of one run's scores."""
    cols = [c for c, _ in COLUMNS if c in scores.columns]
    lines = ["| name | kind | " + " | ".join(h for c, h in COLUMNS if c in cols) + " |"]
    lines.append("|---|---|" + "---:|" * len(cols))
    for _, r in scores.iterrows():
        lines.append(f"| {r['name']} | {r['kind']} | " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="folder holding one demo folder per run")
    parser.add_argument("--runs", nargs="+", default=["demo:0"], help="PRESET:SEED pairs (default demo:0)")
    parser.add_argument("--no-run", dest="run", action="store_false", help="only print tables of finished runs")
    args = parser.parse_args()

    summary = []
    for spec in args.runs:
        preset, seed = spec.split(":")
        out = Path(args.root) / f"{preset}_s{seed}"
        wall = run_demo(out, preset, int(seed)) if args.run else math.nan
        scores = scores_of(out)
        r = ratios(scores)
        best = scores[scores["kind"] == "base"].sort_values("wll_oof").iloc[0]
        print(f"\n### {preset}, seed {seed}\n")
        print(table(scores))
        print(f"\nblend / best base: OOF {r['wll_oof']:.3f}, test {r['wll_test']:.3f}")
        summary.append((preset, seed, best["name"], best["auc_any"], r["wll_oof"], r["wll_test"], wall))
    print("\n| preset | seed | best base (OOF) | its slice AUC OOF | blend/best OOF | blend/best test | wall min |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for preset, seed, name, auc, ro, rt, wall in summary:
        minutes = "" if math.isnan(wall) else f"{wall / 60:.1f}"
        print(f"| {preset} | {seed} | {name} | {auc:.4f} | {ro:.3f} | {rt:.3f} | {minutes} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
