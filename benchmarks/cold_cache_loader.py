"""Loader samples/s with the page cache cold: the random training order against the blocked one (``data.sampler``).

The real conversion cache (~280 GB of int16 volumes) does not fit in RAM, so training reads it from disk. This
script writes a synthetic cache (``--series`` volumes of ``--depth`` × ``--size``² int16, about 11.5 MB each at the
defaults, like a real 400² series of 36 slices), or reads ``--cache``, and times the 2.5D training loader of the GPU
configs (``--slices`` neighbours × 3 windows, ``--crop``, uint8 images, shift-scale-rotate on the device) through a
``DataLoader`` with 0 workers (loading in this process) and 1 worker process — the rate of one loader worker — in
the orders of ``rsna19/data/sampler.py``:

* ``random``: :func:`rsna19.training.trainer.epoch_indices` over the whole cache;
* ``random, new series each sample``: one random slice of a different series per sample — what the random order
  does on a cache much larger than RAM, where a series is almost never still cached when it comes back;
* ``blocked``: ``--block`` neighbouring slices of one series per visit (``data.sampler: blocked``);
* ``blocked, random slices``: ``--block`` random slices of one series (``data.block_contiguous: false``).

**Cold**: before each measured run every ``volume.npy`` is dropped from the page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` (no root needed; the script checks with ``mincore`` that nothing of the
files is left resident and says so when something is). **Warm**: every volume read once before the runs. The
``MB/sample`` column is what the cold read-only run (below) brought into the page cache (``mincore`` of every
volume afterwards) divided by its samples: it includes the kernel's read-around of memory-mapped files
(``read_ahead_kb`` of the device, printed), which is what makes a random order read far more than the slices it
uses. The ``read only`` columns time the I/O alone (each sample's slices copied out of the memory maps, in this
process, no augmentation): on a machine whose cores are busy with other work they are the steadier measure of what
the order changes.

    python benchmarks/cold_cache_loader.py                       # ~2.9 GB synthetic cache in a temp dir
    python benchmarks/cold_cache_loader.py --dir /scratch/x      # the cache on another disk
    python benchmarks/cold_cache_loader.py --cache CACHE         # a real conversion cache (its train split)
    python benchmarks/cold_cache_loader.py --quick
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import math
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from _bench import add_common_arguments, apply_quick, write_json
from torch.utils.data import DataLoader, Subset

from rsna19.core.constants import CLASSES
from rsna19.data.augment import AugmentConfig
from rsna19.data.datasets import SliceDataset, VolumeCache, read_cache_index, read_planes, slice_offsets
from rsna19.data.sampler import blocked_indices
from rsna19.training.trainer import epoch_indices

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def write_cache(root: Path, n_series: int, depth: int, size: int, seed: int = 0) -> Path:
    """A cache of ``n_series`` head-like int16 volumes (docs/contracts.md layout), flushed to disk."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    r = np.hypot(yy - 0.5, xx - 0.5)
    head = np.where(r < 0.36, 30, np.where(r < 0.42, 1000, -1024)).astype(np.int16)
    noise = rng.integers(-8, 9, (4, depth, size, size), dtype=np.int16)  # mixed per series: cheap, not identical
    rows = []
    for s in range(n_series):
        vol = head[None] + np.roll(noise[s % 4], s, axis=1)
        out = root / f"S{s:05d}"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "volume.npy", "wb") as f:
            np.save(f, vol)
            f.flush()
            os.fsync(f.fileno())  # clean pages: fadvise can only drop what is on disk
        for z in range(depth):
            rows.append(
                {
                    "sop_uid": f"S{s}_{z}",
                    "series_uid": f"S{s:05d}",
                    "study_uid": f"St{s}",
                    "patient_id": f"P{s}",
                    "split": "train",
                    "z": z,
                    "n_slices": depth,
                    **{c: 0.0 for c in CLASSES},
                }
            )
    pd.DataFrame(rows).to_parquet(root / "cache_index.parquet")
    return root


def evict(paths: list[Path]) -> None:
    """Drop the files' clean, unmapped pages from the page cache."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(paths: list[Path]) -> None:
    """Read the files once (into the page cache)."""
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def resident_bytes(paths: list[Path]) -> int:
    """Bytes of the files in the page cache (``mincore``; reading the residency does not fault pages in)."""
    page = mmap.PAGESIZE
    total = 0
    for p in paths:
        size = p.stat().st_size
        if not size:
            continue
        with open(p, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        try:
            buf = np.frombuffer(mm, dtype=np.uint8)
            vec = np.zeros((size + page - 1) // page, dtype=np.uint8)
            rc = _LIBC.mincore(
                ctypes.c_void_p(buf.ctypes.data), ctypes.c_size_t(size), vec.ctypes.data_as(ctypes.c_void_p)
            )
            del buf
            if rc != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            total += int((vec & 1).sum()) * page
        finally:
            mm.close()
    return total


def read_ahead_kb(path: Path) -> str:
    """``read_ahead_kb`` of the block device that holds ``path`` (best effort)."""
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for q in (
        base / "queue" / "read_ahead_kb",
        base / ".." / "queue" / "read_ahead_kb",
        base / "bdi" / "read_ahead_kb",
    ):
        try:
            return q.read_text().strip()
        except OSError:
            continue
    return "unknown"


def new_series_order(series: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` items, each a random slice of a different series (the random order on a cache far larger than RAM)."""
    rng = np.random.default_rng(seed)
    uids, codes = np.unique(series, return_inverse=True)
    if n > len(uids):
        raise SystemExit(f"--samples {n} > {len(uids)} series: the 'new series each sample' row needs more series")
    picked = rng.choice(len(uids), size=n, replace=False)
    return np.array([rng.choice(np.flatnonzero(codes == c)) for c in picked], dtype=np.int64)


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def timed_rate(ds: SliceDataset, order: np.ndarray, workers: int, batch: int) -> float:
    """Samples/s of a DataLoader over ``order``; with workers, from the first batch on (start-up not counted)."""
    loader = DataLoader(
        Subset(ds, order.tolist()),
        batch_size=batch,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
    )
    seen, t = 0, time.perf_counter()
    for i, b in enumerate(loader):
        if workers and i == 0:
            t = time.perf_counter()
            continue
        seen += len(b["image"])
    return seen / (time.perf_counter() - t) if seen else float("nan")


def read_rate(cache: Path, series: np.ndarray, z: np.ndarray, order: np.ndarray, slices: int) -> float:
    """Samples/s of only reading each sample's slices (a copy out of the memory maps, as the dataset does)."""
    volumes = VolumeCache(cache)
    offsets = slice_offsets(slices)
    t = time.perf_counter()
    for i in order:
        np.stack(read_planes(volumes(str(series[i])), int(z[i]), offsets))
    rate = len(order) / (time.perf_counter() - t)
    del volumes
    return rate


def visits(series: np.ndarray, order: np.ndarray) -> int:
    """Volume visits of an order: runs of consecutive items of one series."""
    s = series[order]
    return int(1 + np.count_nonzero(s[1:] != s[:-1])) if len(s) else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="a real conversion cache (default: a synthetic one)")
    p.add_argument("--dir", help="where to write the synthetic cache (default: a temp dir, deleted afterwards)")
    p.add_argument("--series", type=int, default=256, help="synthetic volumes")
    p.add_argument("--depth", type=int, default=36, help="slices per synthetic volume")
    p.add_argument("--size", type=int, default=400, help="synthetic volume H = W")
    p.add_argument("--crop", type=int, default=384)
    p.add_argument("--slices", type=int, default=5, help="neighbours per sample (data.slices)")
    p.add_argument("--windows", nargs="+", default=["brain", "subdural", "bone"])
    p.add_argument("--block", type=int, default=8, help="data.block_slices")
    p.add_argument("--samples", type=int, default=192, help="samples per measured run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader worker counts")
    add_common_arguments(p)
    args = p.parse_args()
    apply_quick(args, series=24, depth=20, size=96, crop=64, samples=16, batch=4)

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    tmp = None
    if args.cache:
        cache = Path(args.cache)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="rsna19-cold-", dir=args.dir))
        t0 = time.perf_counter()
        cache = write_cache(tmp, args.series, args.depth, args.size)
        print(f"wrote {args.series} volumes to {cache} in {time.perf_counter() - t0:.1f} s")
    try:
        index = read_cache_index(cache)
        index = index[index["split"] == "train"].reset_index(drop=True)
        paths = [cache / str(u) / "volume.npy" for u in sorted(index["series_uid"].unique())]
        total_gb = sum(q.stat().st_size for q in paths) / 1e9
        aug = AugmentConfig(affine_on_device=True)
        kw = {"slices": args.slices, "size": args.crop, "augment": aug, "train": True, "image_dtype": "uint8"}

        def dataset() -> SliceDataset:
            return SliceDataset(cache, index, args.windows, **kw)

        probe = dataset()
        series, z, n = probe.series, probe.z, len(probe)
        del probe
        n_samples = min(args.samples, n)
        orders: dict[str, Callable[[int], np.ndarray]] = {
            "random": lambda e: epoch_indices(n, n_samples, 0, e),
            "random, new series each sample": lambda e: new_series_order(series, n_samples, e),
            "blocked": lambda e: blocked_indices(series, z, args.block, n_samples, 0, e),
            "blocked, random slices": lambda e: blocked_indices(
                series, z, args.block, n_samples, 0, e, contiguous=False
            ),
        }
        rows: list[dict[str, object]] = []
        table: dict[str, dict[str, float]] = {}
        leftover = 0
        for state in ("cold", "warm"):
            if state == "warm":
                warm(paths)
            for name, make in orders.items():
                cells = table.setdefault(name, {})
                for w in args.workers:
                    epoch = len(rows)  # a fresh order every run: a cold run never finds what the last one read
                    order = make(epoch)
                    gc.collect()  # no memory map of an earlier dataset may pin pages
                    if state == "cold":
                        evict(paths)
                        leftover = max(leftover, resident_bytes(paths))
                    rate = timed_rate(dataset(), order, w, args.batch)
                    gc.collect()
                    key = f"{state}, {w} worker{'s' if w != 1 else ''}"
                    cells[key] = rate
                    rows.append({"case": f"{name}, {key}", "value": rate, "unit": "samples/s"})
                # The I/O alone: the same kind of order, read without augmentation or windowing.
                order = make(len(rows) + 1000)
                gc.collect()
                if state == "cold":
                    evict(paths)
                rate = read_rate(cache, series, z, order, args.slices)
                gc.collect()
                cells[f"{state}, read only"] = rate
                rows.append({"case": f"{name}, {state}, read only", "value": rate, "unit": "samples/s"})
                if state == "cold":  # what that read brought into the page cache, read-around included
                    mb = resident_bytes(paths) / 1e6 / len(order)
                    cells["MB/sample"] = mb
                    cells["visits/sample"] = visits(series, order) / len(order)
                    rows.append({"case": f"{name}, cold, read", "value": mb, "unit": "MB/sample"})
        evict(paths)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    ra = read_ahead_kb(cache.parent if tmp is not None else cache)
    print(
        f"\nCold page cache: 2.5D training loader ({args.slices} slices × {len(args.windows)} windows, crop "
        f"{args.crop}², uint8, affine on device), {len(paths)} volumes ({total_gb:.2f} GB"
        f"{', synthetic ' + str(args.depth) + ' × ' + str(args.size) + '²' if tmp is not None else ''}), "
        f"{n_samples} samples a run, batch {args.batch}, block {args.block}; read_ahead_kb {ra}"
    )
    if leftover:
        print(f"warning: {leftover / 1e6:.1f} MB of the volumes stayed resident after eviction")
    keys = [f"{s}, {w} worker{'s' if w != 1 else ''}" for s in ("cold", "warm") for w in args.workers]
    keys = [*keys[: len(args.workers)], "cold, read only", *keys[len(args.workers) :], "warm, read only"]
    head = f"{'order':<32}" + "".join(f"{k:>17}" for k in keys) + f"{'MB/sample':>11}{'visits/sample':>15}"
    print(head)
    for name, cells in table.items():
        print(
            f"{name:<32}"
            + "".join(f"{cells[k]:>17.1f}" for k in keys)
            + f"{cells['MB/sample']:>11.2f}{cells['visits/sample']:>15.3f}"
        )
    print("(samples/s; MB/sample: page cache filled by the cold read-only run; visits/sample: volume opens)")
    cold = {name: cells[keys[0]] for name, cells in table.items()}
    met = None
    if not args.quick and math.isfinite(cold["blocked"]) and cold["random, new series each sample"] > 0:
        met = cold["blocked"] >= 2 * cold["random, new series each sample"]
    write_json(
        args,
        "cold_cache",
        f"Loader, cold page cache: {args.slices} slices × {len(args.windows)} windows, crop {args.crop}², "
        f"block {args.block}, read_ahead_kb {ra}",
        "blocked order ≥ 2× the random order's samples/s with a cold page cache (0 workers, vs a new series each "
        "sample)",
        rows,
        met,
        {
            "series": len(paths),
            "gb": round(total_gb, 2),
            "samples": n_samples,
            "batch": args.batch,
            "block": args.block,
            "read_ahead_kb": ra,
            "leftover_mb": round(leftover / 1e6, 1),
        },
    )


if __name__ == "__main__":
    main()
