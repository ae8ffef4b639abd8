"""Scanner shift: one trained demo bundle on each scanner-shift preset (issue 23; docs/benchmarks.md, "Scanner shift").

For every preset of :data:`rsna19.synth.shift.SHIFT_PRESETS` (``--presets``; ``none`` is the in-domain reference),
the script writes the preset's test studies once (``OUT/studies/<preset>``, shared by every bundle), runs
``rsna19 predict-study`` on them with the bundle (``OUT/predict/<label>/<preset>``), and prints one row a preset:

* slice AUC(any) and weighted log loss of the stacked output, study AUC(any) with the slice maximum (``max``) and
  with the mean of the three highest slices (``top3``), and the mean ``p_any`` of negative / positive slices;
* ``sens@op`` / ``spec@op``: the sensitivity and specificity of the bundle's calibrated study flag for ``any`` (its
  operating point, chosen for sensitivity 0.95 on the OOF studies);
* ``best base``: the lowest weighted log loss of a single bundled model (``models.csv``) and ``blend − best``.

Every stage is skipped when its output is complete, so an interrupted run continues where it stopped. Rows go to
``OUT/shift_<label>.csv`` too. Command (after ``rsna19 demo --out DEMO``)::

    python benchmarks/shift.py --work DEMO --label base_s0 --out shift_out [--presets none,hu_plus10,...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.synth.shift import SHIFT_PRESETS, write_shift_preset
from rsna19.synth.shift_eval import evaluate_preset

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def ensure_bundle(work: Path) -> Path:
    """``WORK/bundle`` (written with ``rsna19 bundle WORK`` when missing)."""
    bundle = work / "bundle"
    if not (bundle / "bundle.json").is_file():
        _run([sys.executable, "-m", "rsna19", "bundle", str(work), "--out", str(bundle)])
    return bundle


def predict(studies: Path, bundle: Path, out: Path, tta: str) -> Path:
    """``predict-study`` of the preset's studies into ``out`` (skipped when ``out/studies.json`` exists)."""
    if not (out / "studies.json").is_file():
        tmp = out.with_name(out.name + ".partial")
        cmd = [sys.executable, "-m", "rsna19", "predict-study", str(studies / "stage_2_test"), "--bundle", str(bundle)]
        _run([*cmd, "--out", str(tmp), "--device", "cpu", "--tta", tta, "--no-cam"])
        tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="a bundle folder (rsna19 bundle)")
    src.add_argument("--work", type=Path, help="a demo / pipeline run folder (bundled into WORK/bundle if needed)")
    ap.add_argument("--label", required=True, help="name of this bundle in the outputs (e.g. robust_s0)")
    ap.add_argument("--out", type=Path, default=Path("shift_out"))
    ap.add_argument("--presets", default=",".join(SHIFT_PRESETS), help="comma-separated (default: all)")
    ap.add_argument("--n-studies", type=int, default=24)
    ap.add_argument("--tta", default="none")
    ap.add_argument("--workers", type=int, default=2, help="processes writing the studies")
    args = ap.parse_args()
    bundle = args.bundle or ensure_bundle(args.work)
    rows = []
    for name in args.presets.split(","):
        t0 = time.perf_counter()
        studies = args.out / "studies" / name
        write_shift_preset(studies, name, n_studies=args.n_studies, workers=args.workers)
        pred = predict(studies, bundle, args.out / "predict" / args.label / name, args.tta)
        row = {"preset": name, **evaluate_preset(studies, pred)}
        rows.append(row)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.out / f"shift_{args.label}.csv", index=False)
    ref = table.set_index("preset").get("study_auc_max", pd.Series(dtype=float)).get("none", np.nan)
    print(f"\n**Scanner shift, {args.label}** (bundle {bundle}, {args.n_studies} studies a preset, TTA {args.tta})\n")
    print("| preset | factor | study AUC max | Δ vs none | study AUC top3 | slice AUC | slice wll | p_any neg / pos "
          "| sens@op | spec@op | best base wll | blend − best |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['preset']} | {SHIFT_PRESETS[r['preset']].factor} | {r['study_auc_max']:.3f} | "
            f"{r['study_auc_max'] - ref:+.3f} | {r['study_auc_top3']:.3f} | {r['slice_auc']:.3f} | "
            f"{r['slice_wll']:.4f} | {r['p_neg']:.2f} / {r['p_pos']:.2f} | {r['sens_op']:.2f} | {r['spec_op']:.2f} | "
            f"{r['best_base_wll']:.4f} ({r['best_base']}) | {r['blend_minus_best']:+.4f} |"
        )


if __name__ == "__main__":
    main()
