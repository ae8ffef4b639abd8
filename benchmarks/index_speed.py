"""Speed of `rsna19 index` against a bare ``pydicom.dcmread(stop_before_pixels=True)`` loop.

Writes ``--files`` synthetic CT slices (``--size``² int16, RSNA-like headers, series of 40 slices in nested
folders) with :func:`rsna19.io.dicom_write.write_ct_dicom` into a temporary folder, then times, on the same
files, in one run and interleaved ``--repeats`` times (best time kept, files in the page cache for all):

* ``bare``: walk the folder and ``dcmread(path, stop_before_pixels=True)`` every file, nothing else;
* ``index wN``: the whole :func:`rsna19.io.index.build_index` with N workers (walk, header checks, pixel buffer
  size check, geometry, slice order, parquet + errors csv written).

The CPU column (this process + pool workers, user + system) shows the parallel overhead independently of
how busy the machine is. Goals (issue 2): 1 worker ≥ 0.8× the bare loop's files/s; 2 workers ≥ 1.5× the 1-worker rate.

Usage: python benchmarks/index_speed.py [--files 2000] [--size 512] [--workers 1,2] [--repeats 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from _bench import add_common_arguments, apply_quick, write_json

from rsna19.io.dicom_write import SliceGeometry, StorageVariant, write_ct_dicom
from rsna19.io.index import build_index

SLICES_PER_SERIES = 40


def make_files(root: Path, n: int, size: int) -> None:
    """Write ``n`` slices as series of 40 in ``root/stage_2_train/<series>/`` (skipped if already there)."""
    marker = root / f".done-{n}-{size}"
    if marker.exists():
        return
    warnings.filterwarnings("ignore", "Invalid value for VR UI", UserWarning)  # Kaggle-style "ID_…" UIDs
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 1500, size=(size, size)).astype(np.float64)
    for i in range(n):
        s, k = divmod(i, SLICES_PER_SERIES)
        folder = root / "stage_2_train" / f"s{s:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        write_ct_dicom(
            folder / f"ID_{rng.integers(16**9):09x}.dcm",
            hu,
            SliceGeometry(ipp=(-125.0, -125.0, 5.0 * k), iop=(1, 0, 0, 0, 1, 0), pixel_spacing=(0.488, 0.488)),
            sop_uid=f"ID_{i:09x}",
            series_uid=f"ID_s{s:07x}",
            study_uid=f"ID_t{s:07x}",
            patient_id=f"ID_p{s // 2:07x}",
            instance_number=k + 1,
            variant=StorageVariant(wrap12=(s % 3 == 0)),
            extra={"WindowCenter": [36.0, 36.0], "WindowWidth": [80.0, 80.0]},
        )
    marker.touch()


def bare_loop(root: Path) -> int:
    """Walk ``root`` and read every file's header with pydicom; returns the number of files."""
    n = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".dcm"):
                pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
                n += 1
    return n


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the pool workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}, pydicom {pydicom.__version__}, numpy {np.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", help="folder for the files (kept); default: a temporary folder, removed after")
    add_common_arguments(ap)
    args = ap.parse_args(argv)
    apply_quick(args, files=200, size=128, repeats=2)
    workers = [int(w) for w in args.workers.split(",")]

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="rsna19-index-bench-"))
    try:
        t = time.perf_counter()
        make_files(root / "data", args.files, args.size)
        print(f"{args.files} files of {args.size}x{args.size} in {root} ({time.perf_counter() - t:.1f} s to write)")
        bare_loop(root / "data")  # warm the page cache and the imports
        best: dict[str, float] = {}
        cpu: dict[str, float] = {}

        def timed(name: str, fn) -> None:
            c, t = cpu_seconds(), time.perf_counter()
            fn()
            wall = time.perf_counter() - t
            if wall < best.get(name, np.inf):
                best[name], cpu[name] = wall, cpu_seconds() - c

        for _ in range(args.repeats):
            timed("bare", lambda: bare_loop(root / "data"))
            for w in workers:
                out = root / f"index_w{w}.parquet"
                timed(
                    f"index w{w}",
                    lambda w=w, out=out: build_index(
                        [root / "data"], out=out, workers=w, progress=False, overwrite=True
                    ),
                )
            assert len(pd.read_parquet(root / f"index_w{workers[0]}.parquet")) == args.files
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"machine: {machine()}; load average at the end {load}")
    print(f"command: python benchmarks/index_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    rate = {k: args.files / v for k, v in best.items()}
    one = rate.get("index w1")
    print("| method | files | seconds | CPU s | files/s | vs bare | vs index w1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, sec in best.items():
        vs_one = f"{rate[k] / one:.2f}×" if one and k.startswith("index") else ""
        vs_bare = f"{rate[k] / rate['bare']:.2f}×"
        print(f"| {k} | {args.files} | {sec:.3f} | {cpu[k]:.3f} | {rate[k]:.0f} | {vs_bare} | {vs_one} |")
    met = None
    if one and "bare" in rate:
        met = one >= 0.8 * rate["bare"] and ("index w2" not in rate or rate["index w2"] >= 1.5 * one)
    write_json(
        args,
        "index",
        f"Index: {args.files} files of {args.size}², best of {args.repeats}",
        "index w1 ≥ 0.8× the bare dcmread loop; index w2 ≥ 1.5× index w1",
        [{"case": k, "value": rate[k], "unit": "files/s"} for k in best]
        + [{"case": f"{k} CPU", "value": cpu[k], "unit": "CPU s"} for k in best],
        met,
        {"files": args.files, "size": args.size, "workers": args.workers},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
