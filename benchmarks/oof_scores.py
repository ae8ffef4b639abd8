"""OOF weighted log loss of finished runs, all folds together and per fold, as a markdown table.

Reads ``RUNS/<model>/fold_*/oof.parquet`` (written by ``rsna19 predict RUN --fold k --split oof``) and scores the
concatenated files with the competition metric. Used for the "Families (demo)" table of ``docs/benchmarks.md``.

Usage: python benchmarks/oof_scores.py RUNS [MODEL ...]   (default: every run under RUNS with OOF files)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from rsna19.core.constants import CLASSES
from rsna19.core.metrics import weighted_log_loss


def score(frame: pd.DataFrame) -> float:
    """Weighted log loss of the ``p_<class>`` columns against the label columns of a prediction frame."""
    return weighted_log_loss(frame[list(CLASSES)].to_numpy(), frame[[f"p_{c}" for c in CLASSES]].to_numpy())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="the RUNS folder")
    parser.add_argument("models", nargs="*", help="run names under RUNS (default: all with OOF predictions)")
    args = parser.parse_args()
    runs = Path(args.runs)
    names = args.models or sorted(p.name for p in runs.iterdir() if any(p.glob("fold_*/oof.parquet")))
    if not names:
        print(f"no OOF predictions under {runs}", file=sys.stderr)
        return 1
    frames = {n: sorted((runs / n).glob("fold_*/oof.parquet")) for n in names}
    # Columns are the folds that have files (fold_0 and fold_2 only → two columns, named by their number).
    folds = sorted({int(f.parent.name.removeprefix("fold_")) for files in frames.values() for f in files})
    n_folds = len(folds)
    print(f"| model | slices | OOF wll | {' | '.join(f'fold {k}' for k in folds)} |")
    print(f"|---|---:|---:|{'---:|' * n_folds}")
    for name, files in frames.items():
        if not files:
            print(f"| {name} | 0 | no OOF files |{' |' * n_folds}")
            continue
        df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        per = {int(k): score(g) for k, g in df.groupby("fold")}
        cells = " | ".join(f"{per[k]:.4f}" if k in per else "" for k in folds)
        print(f"| {name} | {len(df)} | {score(df):.4f} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
