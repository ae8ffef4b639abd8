"""Wall time of ``rsna19 predict-study`` on synthetic head-CT studies, per study shape, folds and TTA views.

Two studies of one synthetic head (:mod:`rsna19.synth` phantom, written by the project's DICOM writer): 40 slices
of 5 mm and 250 slices of 0.625 mm (reformatted by predict-study into slabs of the training spacing), ``--size``²
pixels. Each case runs the command in a fresh process (``rsna19 predict-study STUDY --bundle B --out OUT --device
cpu --folds F --tta T``), so the wall time is what a user waits: interpreter start, imports, bundle loading, header
scan, series ranking, conversion, reformatting, every model × fold × TTA view, the stacker and the report with its
Grad-CAM. Rows: study × folds (all bundled / the first only) × TTA (none / none,hflip); the per-series convert /
reformat / models / stack seconds come from ``studies.json``. The bundle is ``--bundle``, else ``WORK/bundle``
(exported from ``--work`` first when missing), else one exported from a tiny pipeline run made on the spot.

Usage: python benchmarks/predict_study_speed.py [--bundle B] [--work demo_out] [--size 512] [--threads 2]
       [--repeats 1] [--device cpu] [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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


def write_study(root: Path, n_slices: int, step: float, size: int, seed: int = 7) -> Path:
    """One synthetic study of ``n_slices`` slices ``step`` mm apart, ``size``² pixels, under ``root``.

    The head and bleeds are those of ``seed`` whatever the slice spacing; the slab is centred on the same point, and
    thinner slices get proportionally more noise (SD ∝ 1/√thickness), as on a scanner.
    """
    from rsna19.synth.dataset import SPLIT_DIRS, render_series
    from rsna19.synth.plan import make_plan
    from rsna19.synth.presets import Preset

    preset = Preset(
        name="bench",
        image_size=size,
        n_train_studies=1,
        n_test_studies=1,
        n_repeat_patients=0,
        n_slices=(40, 40),
        table_step=(5.0, 5.0),
        bleed_fraction=1.0,
        tilt_fraction=0.0,
    )
    plan = dataclasses.replace(make_plan(preset, seed)[-1], corrupt_slice=None)
    g = plan.geometry
    mid = g.centre[2] + (g.n_slices - 1) / 2 * g.table_step
    geom = dataclasses.replace(
        g,
        n_slices=n_slices,
        table_step=step,
        slice_thickness=step,
        centre=(g.centre[0], g.centre[1], mid - (n_slices - 1) / 2 * step),
    )
    tag = f"{n_slices}x{step:g}"
    plan = dataclasses.replace(
        plan,
        geometry=geom,
        series_uid=f"{plan.series_uid}_{tag}",
        study_uid=f"{plan.study_uid}_{tag}",
        sop_uids=tuple(f"{plan.series_uid}_{tag}_{k}" for k in range(n_slices)),
        file_names=tuple(f"IM{k:04d}.dcm" for k in range(n_slices)),
        instance_numbers=tuple(range(1, n_slices + 1)),
        noise_sd=plan.noise_sd * math.sqrt(5.0 / step),
    )
    root = root / tag
    for d in (*SPLIT_DIRS.values(), "masks"):
        (root / d).mkdir(parents=True, exist_ok=True)
    render_series(plan, root)
    return root / SPLIT_DIRS[plan.split]


def find_bundle(args: argparse.Namespace, scratch: Path) -> Path:
    """The bundle to time (see the module docstring)."""
    from rsna19.study.bundle import export_bundle

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


def _series_seconds(summary: dict) -> dict[str, float]:
    """Per-step seconds summed over the series of the (only) study."""
    out: dict[str, float] = {}
    for series in summary["studies"][0].get("series_used", []):
        for key, value in (series.get("seconds") or {}).items():
            out[key] = out.get(key, 0.0) + float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle folder (default: WORK/bundle)")
    parser.add_argument("--work", default="demo_out", help="a finished `rsna19 demo` / `rsna19 run` folder")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch / BLAS threads of the predict-study process")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    add_common_arguments(parser)
    args = parser.parse_args()
    apply_quick(args, size=128, repeats=1)
    shapes = [(8, 5.0), (40, 0.625)] if args.quick else [(40, 5.0), (250, 0.625)]

    with tempfile.TemporaryDirectory(prefix="rsna19-bench-") as tmp:
        scratch = Path(tmp)
        bundle = find_bundle(args, scratch)
        manifest = json.loads((bundle / "bundle.json").read_text())
        folds = sorted({int(k) for m in manifest["models"] for k in m["folds"]})
        studies = {f"{n} × {step:g} mm": write_study(scratch / "data", n, step, args.size) for n, step in shapes}
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        base = [sys.executable, "-m", "rsna19.cli", "predict-study", "--bundle", str(bundle), "--device", args.device]
        cases = [
            (f"all ({len(folds)})", "all", "none"),
            ("one (0)", str(folds[0]), "none"),
            (f"all ({len(folds)})", "all", "none,hflip"),
            ("one (0)", str(folds[0]), "none,hflip"),
        ]
        n_nets = {"all": sum(len(m["folds"]) for m in manifest["models"]), "one": len(manifest["models"])}
        rows = []
        for study_name, study in studies.items():
            for label, fold_arg, tta in cases:
                walls, parts = [], []
                for r in range(args.repeats):
                    out = scratch / f"out-{len(rows)}-{r}"
                    cmd = [*base, str(study), "--out", str(out), "--folds", fold_arg, "--tta", tta]
                    t0 = time.perf_counter()
                    subprocess.run(cmd, check=True, env=env, capture_output=True)
                    walls.append(time.perf_counter() - t0)
                    summary = json.loads((out / "studies.json").read_text())
                    parts.append((summary, _series_seconds(summary)))
                best = min(range(len(walls)), key=walls.__getitem__)
                summary, sec = parts[best]
                st = summary["studies"][0]
                reform = (st.get("series_used") or [{}])[0].get("reformat")
                rows.append(
                    {
                        "study": study_name,
                        "folds": label,
                        "tta": tta,
                        "nets": n_nets["all" if fold_arg == "all" else "one"],
                        "wall": walls[best],
                        "load": summary["bundle_load_s"],
                        "study_s": st["seconds"],
                        "sec": sec,
                        "slabs": reform["n_slabs"] if reform else None,
                        "p_any": st["prediction"]["max_probability"]["any"] if st["status"] == "ok" else float("nan"),
                    }
                )
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
            f"python {platform.python_version()}; threads {args.threads}; device {args.device}"
        )
        print(
            f"bundle {bundle}: {', '.join(m['name'] for m in manifest['models'])}, folds {folds}, bundle TTA "
            f"{'+'.join(manifest['tta'])}, stacker {manifest['stacker']['method']}; slices {args.size}²"
        )
        print(
            "| study | folds | TTA | nets | wall s (process) | bundle load s | study s | convert s | reformat s "
            "| models s | stack s | slabs | max p_any |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            sec = r["sec"]
            print(
                f"| {r['study']} | {r['folds']} | {r['tta']} | {r['nets']} | {r['wall']:.1f} | {r['load']:.1f} | "
                f"{r['study_s']:.1f} | {sec.get('convert_s', 0):.1f} | {sec.get('reformat_s', 0):.2f} | "
                f"{sec.get('models_s', 0):.1f} | {sec.get('stack_s', 0):.2f} | {r['slabs'] or '–'} | "
                f"{r['p_any']:.3f} |"
            )
        first = rows[0]["wall"]
        goal_s = 20.0 if args.device == "cpu" else 3.0
        write_json(
            args,
            "predict_study",
            f"predict-study: 5 mm and 0.625 mm studies, {args.size}², folds all/one × TTA none/hflip, "
            f"{args.threads} thread(s), {args.device}",
            f"< {goal_s:.0f} s wall for the 40-slice study, model loading included",
            [
                {"case": f"{r['study']}, folds {r['folds']}, TTA {r['tta']}", "value": r["wall"], "unit": "s"}
                for r in rows
            ],
            None if args.quick else first < goal_s,
            {"bundle": str(bundle), "folds": folds, "size": args.size},
        )


if __name__ == "__main__":
    main()
