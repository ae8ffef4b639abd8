"""Wall time and scores of ``rsna19 demo`` end to end (synth + index + convert + folds + train + predict + stack).

Runs ``rsna19 demo --out TMP`` in a fresh process, as ``make demo`` does, and reads ``TMP/pipeline_summary.json``:
the time of each stage, the OOF / test weighted log loss of every base model and of the blend. Goal (issue 7):
under 15 minutes on two CPU cores. ``--quick`` runs the tiny preset through the tiny pipeline instead (seconds).

Usage: python benchmarks/demo_speed.py [--out DIR] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import add_common_arguments, write_json  # noqa: E402

GOAL_S = 15 * 60.0


def run(out: Path, quick: bool) -> float:
    """Run the demo (or the tiny pipeline) into ``out``; the process's wall time in seconds."""
    cli = [sys.executable, "-m", "rsna19.cli"]
    t0 = time.perf_counter()
    if quick:
        subprocess.run([*cli, "synth", str(out / "data"), "--preset", "tiny"], check=True, capture_output=True)
        cmd = [*cli, "run", "--data", str(out / "data"), "--out", str(out), "--pipeline", "tiny"]
    else:
        cmd = [*cli, "demo", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:])} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    print(proc.stdout)
    return time.perf_counter() - t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="demo folder (kept; default: a temporary folder, removed after)")
    add_common_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rsna19-demo-") as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "demo"
        wall = run(out, args.quick)
        summary = json.loads((out / "pipeline_summary.json").read_text(encoding="utf-8"))
    rows = [{"case": "total wall (process, synth included)", "value": wall, "unit": "s"}]
    rows += [{"case": f"stage {k}", "value": v, "unit": "s"} for k, v in summary["timings_s"].items()]
    for s in summary["scores"]:
        if s["kind"] in ("base", "mean", "blend"):
            rows.append({"case": f"{s['name']} OOF wll", "value": s["wll_oof"], "unit": "wll"})
            if s.get("wll_test") is not None:
                rows.append({"case": f"{s['name']} test wll", "value": s["wll_test"], "unit": "wll"})
    print(f"demo wall time {wall:.1f} s (goal < {GOAL_S:.0f} s)")
    write_json(
        args,
        "demo",
        "Demo end to end: `rsna19 demo`" if not args.quick else "Tiny pipeline end to end (--quick)",
        "< 15 min on 2 CPU cores, synth included",
        rows,
        None if args.quick else wall < GOAL_S,
        {"pipeline": summary.get("pipeline"), "models": summary.get("models")},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
