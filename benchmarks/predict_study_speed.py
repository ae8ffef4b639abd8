"""Wall time of ``rsna19 predict-study`` on one synthetic 40-slice 512² CT study, model loading included.

The study is rendered by the synthetic phantom (:mod:`rsna19.synth`) at 512 × 512 and written as DICOM; the command
runs in a fresh process (``rsna19 predict-study STUDY --bundle B --out OUT --device cpu``), so the measured time is
what a user waits: interpreter start, imports, bundle loading, header scan, conversion, every model × fold × TTA,
the stacker, the report and its Grad-CAM. The bundle is ``--bundle``, else ``demo_out/bundle`` (exported from
``demo_out`` first when missing), else one exported from a tiny pipeline run made on the spot.

Usage: python benchmarks/predict_study_speed.py [--bundle B] [--work demo_out] [--slices 40] [--size 512]
       [--threads 2] [--repeats 3] [--device cpu] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import add_common_arguments, apply_quick, write_json  # noqa: E402


def write_study(root: Path, n_slices: int, size: int, seed: int = 7) -> Path:
    """One synthetic study of ``n_slices`` slices of ``size``² under ``root/study``; returns that folder."""
    from rsna19.synth.dataset import SPLIT_DIRS, render_series
    from rsna19.synth.plan import make_plan
    from rsna19.synth.presets import Preset

    preset = Preset(
        name="bench",
        image_size=size,
        n_train_studies=1,
        n_test_studies=1,
        n_repeat_patients=0,
        n_slices=(n_slices, n_slices),
        table_step=(4.0, 5.0),
        bleed_fraction=1.0,
        tilt_fraction=0.0,
    )
    plan = dataclasses.replace(make_plan(preset, seed)[-1], corrupt_slice=None)
    for d in (*SPLIT_DIRS.values(), "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    render_series(plan, root)
    return root / SPLIT_DIRS[plan.split]


def find_bundle(args: argparse.Namespace, scratch: Path) -> Path:
    """The bundle to time (see the module docstring)."""
    from rsna19.bundle import export_bundle

    if args.bundle:
        return Path(args.bundle)
    work = Path(args.work)
    if (work / "bundle" / "bundle.json").is_file():
        return work / "bundle"
    if (work / "pipeline.yaml").is_file():
        return export_bundle(work, work / "bundle").path
    from rsna19.pipeline.config import load_pipeline
    from rsna19.pipeline.run import run_pipeline
    from rsna19.synth import generate_dataset

    print(f"no run in {work}: making a tiny one (the timing then says little about the demo models)")
    generate_dataset(scratch / "data", preset="tiny", progress=False)
    run_pipeline(scratch / "data", scratch / "work", load_pipeline("tiny"), say=lambda _s: None)
    return export_bundle(scratch / "work", scratch / "bundle").path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle folder (default: WORK/bundle)")
    parser.add_argument("--work", default="demo_out", help="a finished `rsna19 demo` / `rsna19 run` folder")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch / BLAS threads of the predict-study process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    add_common_arguments(parser)
    args = parser.parse_args()
    apply_quick(args, slices=8, size=128, repeats=1)

    with tempfile.TemporaryDirectory(prefix="rsna19-bench-") as tmp:
        scratch = Path(tmp)
        bundle = find_bundle(args, scratch)
        study = write_study(scratch / "data", args.slices, args.size)
        manifest = json.loads((bundle / "bundle.json").read_text())
        n_nets = sum(len(m["folds"]) for m in manifest["models"])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "rsna19.cli", "predict-study", str(study), "--bundle", str(bundle)]
        cmd += ["--device", args.device]
        rows = []
        for r in range(args.repeats):
            out = scratch / f"out{r}"
            t0 = time.perf_counter()
            subprocess.run([*cmd, "--out", str(out)], check=True, env=env, capture_output=True)
            wall = time.perf_counter() - t0
            s = json.loads((out / "studies.json").read_text())
            rows.append((wall, s["bundle_load_s"], s["studies"][0]["seconds"], s["total_s"]))
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
            f"python {platform.python_version()}; threads {args.threads}; device {args.device}"
        )
        print(
            f"study: {args.slices} slices of {args.size}²; bundle {bundle}: "
            f"{', '.join(m['name'] for m in manifest['models'])} ({n_nets} nets), TTA {'+'.join(manifest['tta'])}, "
            f"stacker {manifest['stacker']['method']}"
        )
        print("| run | wall s (process) | bundle load s | study s (convert + predict + report) | in-process total s |")
        print("|---:|---:|---:|---:|---:|")
        for i, (wall, load, study_s, total) in enumerate(rows):
            print(f"| {i + 1} | {wall:.1f} | {load:.1f} | {study_s:.1f} | {total:.1f} |")
        best = min(r[0] for r in rows)
        goal_s = 20.0 if args.device == "cpu" else 3.0
        print(f"best wall time: {best:.1f} s (goal < {goal_s:.0f} s)")
        write_json(
            args,
            "predict_study",
            f"predict-study: one {args.slices}-slice {args.size}² study, {n_nets} nets, {args.threads} thread(s), "
            f"{args.device}",
            f"< {goal_s:.0f} s wall, model loading included ({'demo' if args.device == 'cpu' else '5-fold'} bundle)",
            [
                {"case": "wall (process)", "value": best, "unit": "s"},
                {"case": "bundle load", "value": min(r[1] for r in rows), "unit": "s"},
                {"case": "study (convert + predict + report)", "value": min(r[2] for r in rows), "unit": "s"},
            ],
            None if args.quick else best < goal_s,
            {"bundle": str(bundle), "nets": n_nets, "slices": args.slices, "size": args.size},
        )


if __name__ == "__main__":
    main()
