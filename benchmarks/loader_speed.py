"""Samples/s of the 2.5D loader per worker process, next to the model's train-step rate on the same machine.

Default: 5 slices × 3 windows, 384² random crop from 400² volumes, on a synthetic cache written to a temporary
directory (or ``--cache`` for a real one); float32 and uint8 images (``data.image_dtype``, decoded on the device);
the full training augmentation in the worker, the same with the shift-scale-rotate left to the device
(``data.augment.affine_on_device``), and the validation centre crop. One worker = the dataset called in this
process with one OpenCV and one torch thread, which is what each DataLoader worker does. The goal (≥ 500
samples/s) is checked on the training loader of the GPU configs (configs/rsna2019: uint8, affine on device).

    python benchmarks/loader_speed.py                     # the issue's setting
    python benchmarks/loader_speed.py --size 128 --crop 112 --samples 200 --backbone resnet10t
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from _bench import add_common_arguments, apply_quick, write_json
from torch.utils.data import DataLoader

from rsna19.core.constants import CLASSES
from rsna19.data.augment import AugmentConfig
from rsna19.data.datasets import SliceDataset, read_cache_index


def synthetic_cache(root: Path, n_series: int = 4, n_slices: int = 32, size: int = 400, seed: int = 0) -> Path:
    """A cache of head-like random volumes (docs/contracts.md layout, enough for the datasets)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    r = np.hypot(yy - 0.5, xx - 0.5)
    rows = []
    for s in range(n_series):
        vol = np.where(r < 0.36, 30, np.where(r < 0.42, 1000, -1024)).astype(np.float32)
        vol = np.repeat(vol[None], n_slices, 0) + rng.normal(0, 5, (n_slices, size, size)).astype(np.float32)
        (root / f"S{s}").mkdir(parents=True, exist_ok=True)
        np.save(root / f"S{s}" / "volume.npy", vol.astype(np.int16))
        for z in range(n_slices):
            rows.append(
                {
                    "sop_uid": f"S{s}_{z}",
                    "series_uid": f"S{s}",
                    "study_uid": f"St{s}",
                    "patient_id": f"P{s}",
                    "split": "train",
                    "z": z,
                    "n_slices": n_slices,
                    **{c: 0.0 for c in CLASSES},
                }
            )
    pd.DataFrame(rows).to_parquet(root / "cache_index.parquet")
    return root


def loader_rate(ds: SliceDataset, n: int) -> float:
    """Samples/s of ``ds[i]`` in this process (one worker's work)."""
    ds[0]
    order = np.random.default_rng(0).integers(0, len(ds), n)
    t = time.perf_counter()
    for i in order:
        ds[int(i)]
    return n / (time.perf_counter() - t)


def dataloader_rate(ds: SliceDataset, n: int, workers: int, batch: int) -> float:
    """Samples/s through a DataLoader with ``workers`` processes."""
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, persistent_workers=False)
    seen, t = 0, None
    for b in loader:
        if t is None:  # exclude worker start-up
            t = time.perf_counter()
            continue
        seen += len(b["image"])
        if seen >= n:
            break
    return seen / (time.perf_counter() - t) if t and seen else float("nan")


def train_step_rate(backbone: str, in_chans: int, crop: int, batch: int, steps: int) -> float:
    """Images/s of forward + backward + AdamW step of a clf2dc model on CPU tensors."""
    from rsna19.nets import build_model

    model = build_model("clf2dc", backbone=backbone, n_windows=in_chans, n_slices=1)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    x, y = torch.randn(batch, in_chans, crop, crop), torch.rand(batch, 6).round()
    for i in range(steps + 1):
        if i == 1:
            t = time.perf_counter()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", help="a real conversion cache (default: synthetic, in a temp dir)")
    p.add_argument("--size", type=int, default=400, help="synthetic volume H = W")
    p.add_argument("--crop", type=int, default=384)
    p.add_argument("--slices", type=int, default=5)
    p.add_argument("--windows", nargs="+", default=["brain", "subdural", "bone"])
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--dtypes", nargs="+", default=["float32", "uint8"], help="image dtypes to time (data.image_dtype)")
    p.add_argument("--workers", type=int, nargs="*", default=[2], help="DataLoader worker counts to time")
    p.add_argument("--backbone", default="resnet34", help="model for the train-step rate ('' to skip)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    add_common_arguments(p)
    args = p.parse_args()
    apply_quick(args, size=96, crop=64, samples=40, workers=[1], backbone="test_resnet", batch=4, steps=2)

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else synthetic_cache(Path(tmp), size=args.size)
        index = read_cache_index(cache)
        index = index[index["split"] == "train"]
        rows = []
        # (name, augmentation, train): the training loader with the affine in the worker, the same with the affine
        # left to the device (configs/rsna2019: the worker crops and flips), and the validation loader.
        cases = (
            ("augmented", AugmentConfig(), True),
            ("augmented, affine on device", AugmentConfig(affine_on_device=True), True),
            ("centre crop", None, False),
        )

        def dataset(aug: AugmentConfig | None, train: bool, dtype: str) -> SliceDataset:
            kw = {"slices": args.slices, "size": args.crop, "augment": aug, "train": train, "image_dtype": dtype}
            return SliceDataset(cache, index, args.windows, **kw)

        for dtype in args.dtypes:
            for name, aug, train in cases:
                rate = loader_rate(dataset(aug, train, dtype), args.samples)
                rows.append((f"loader, 1 worker, {name}, {dtype}", rate, "samples/s"))
        for dtype in args.dtypes:
            for name, aug, train in cases[:2]:
                for w in args.workers:
                    rate = dataloader_rate(dataset(aug, train, dtype), args.samples, w, args.batch)
                    rows.append((f"DataLoader, {w} workers, {name}, {dtype}", rate, "samples/s"))
        if args.backbone:
            torch.set_num_threads(max(1, torch.get_num_threads()))
            c = args.slices * len(args.windows)
            for threads in sorted({1, torch.get_num_interop_threads()}):
                torch.set_num_threads(threads)
                rate = train_step_rate(args.backbone, c, args.crop, args.batch, args.steps)
                rows.append(
                    (f"train step {args.backbone} {c}ch {args.crop}², {threads} thread(s), CPU", rate, "images/s")
                )
    print(
        f"\n2.5D loader: {args.slices} slices × {len(args.windows)} windows, crop {args.crop}² "
        f"(volumes {args.size}²){' from ' + args.cache if args.cache else ', synthetic cache'}"
    )
    print(f"{'what':<66} {'rate':>10}")
    for what, rate, unit in rows:
        print(f"{what:<66} {rate:>10.1f} {unit}")
    # The goal is about the training loader as configured for a GPU (configs/rsna2019: uint8 images decoded on the
    # device, the shift-scale-rotate applied there); the other rows show what each of the two choices is worth.
    goal = "loader, 1 worker, augmented, affine on device, uint8"
    single = [rate for what, rate, _ in rows if what == goal]
    write_json(
        args,
        "loader",
        f"Loader: {args.slices} slices × {len(args.windows)} windows, crop {args.crop}² of {args.size}²",
        "≥ 500 samples/s per loader worker (training loader as configured for a GPU: uint8, affine on device)",
        [{"case": what, "value": rate, "unit": unit} for what, rate, unit in rows],
        None if args.quick or not single else min(single) >= 500,
        {"size": args.size, "crop": args.crop, "samples": args.samples},
    )


if __name__ == "__main__":
    main()
