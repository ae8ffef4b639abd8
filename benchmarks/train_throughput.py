"""Train-step throughput: real loader batches vs random tensors already on the device.

The gap between the two rows is the input pipeline's cost; the random-tensor row is the model's ceiling on this
device with the chosen ``--amp`` / ``--channels-last``. Runs on CPU with tiny sizes too:

    python benchmarks/train_throughput.py --device cpu --backbone resnet10t --crop 64 --batch 8 --steps 3
    python benchmarks/train_throughput.py --device cuda --amp bf16 --channels-last --workers 8   # GPU
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from _bench import add_common_arguments, apply_quick, write_json
from loader_speed import synthetic_cache
from torch.utils.data import DataLoader

from rsna19.data.augment import AugmentConfig
from rsna19.data.datasets import SliceDataset, read_cache_index
from rsna19.engine.losses import weighted_bce
from rsna19.engine.runtime import Runtime, resolve_amp, resolve_device
from rsna19.nets import build_model, get_model_spec
from rsna19.training.trainer import _worker_init


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, opt, scaler, batches, rt: Runtime, steps: int, warmup: int = 2) -> float:  # noqa: ANN001
    """Images/s over ``steps`` optimiser steps after ``warmup`` (batches: an iterator of loader-style dicts).

    Each batch goes through the trainer's input path (:meth:`Runtime.image`: copy, uint8 decode, device-side
    affine, channels-last), so its cost is part of the step, as in ``rsna19 train``.
    """
    seen, t0 = 0, None
    for i, batch in enumerate(itertools.islice(batches, warmup + steps)):
        if i == warmup:
            _sync(rt.device)
            t0 = time.perf_counter()
        x, y = rt.image(batch), rt.to(batch["target"])
        with rt.autocast():
            loss = weighted_bce(model(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if i >= warmup:
            seen += len(x)
    _sync(rt.device)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clf2dc", help="registered model name")
    p.add_argument("--backbone", default="resnet34")
    p.add_argument("--slices", type=int, default=5)
    p.add_argument("--windows", nargs="+", default=["brain", "subdural", "bone"])
    p.add_argument("--size", type=int, default=400, help="synthetic volume H = W")
    p.add_argument("--crop", type=int, default=384)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--cache", help="real conversion cache (default: synthetic in a temp dir)")
    p.add_argument("--image-dtype", default="uint8", choices=("float32", "uint8"), help="data.image_dtype")
    p.add_argument(
        "--affine-on-device",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="data.augment.affine_on_device (default on, as in configs/rsna2019)",
    )
    add_common_arguments(p)
    args = p.parse_args()
    apply_quick(args, backbone="test_resnet", crop=64, size=80, batch=8, steps=3, workers=0)

    device = resolve_device(args.device)
    amp = resolve_amp(args.amp, device)
    channels_last = args.channels_last and device.type == "cuda"
    layout = get_model_spec(args.model).input_layout
    model = build_model(args.model, backbone=args.backbone, n_windows=len(args.windows), n_slices=args.slices)
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache) if args.cache else synthetic_cache(Path(tmp), n_slices=48, size=args.size)
        index = read_cache_index(cache)
        ds = SliceDataset(
            cache,
            index[index["split"] == "train"],
            args.windows,
            slices=args.slices,
            layout=layout,
            size=args.crop,
            augment=AugmentConfig(affine_on_device=args.affine_on_device),
            train=True,
            image_dtype=args.image_dtype,
        )
        loader = DataLoader(
            ds,
            batch_size=args.batch,
            shuffle=True,
            num_workers=args.workers,
            drop_last=True,
            pin_memory=device.type == "cuda",
            worker_init_fn=_worker_init,
            persistent_workers=args.workers > 0,
        )
        real = (b for _ in itertools.count() for b in loader)
        shape = ds[0]["image"].shape
        x = torch.rand(args.batch, *shape, device=device)
        y = torch.rand(args.batch, 6, device=device).round()
        rt = Runtime(device, amp, channels_last)
        rows = [
            (
                "random tensors on device",
                time_steps(model, opt, scaler, itertools.repeat({"image": x, "target": y}), rt, args.steps),
            ),
            (
                f"loader batches ({args.workers} workers)",
                time_steps(model, opt, scaler, real, rt, args.steps),
            ),
        ]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\n{args.model}/{args.backbone}, input {tuple(shape)}, batch {args.batch}, {name}, amp {amp}, "
        f"channels_last {channels_last}"
    )
    print(f"{'input':<32} {'images/s':>10} {'ms/step':>10}")
    for what, rate in rows:
        print(f"{what:<32} {rate:>10.1f} {1000 * args.batch / rate:>10.1f}")
    write_json(
        args,
        "train",
        f"Train step: {args.model}/{args.backbone}, input {tuple(shape)}, batch {args.batch}, {name}, amp {amp}",
        "loader batches within 10 % of random tensors (the input pipeline is not the bottleneck)",
        [{"case": what, "value": rate, "unit": "images/s"} for what, rate in rows],
        rows[1][1] >= 0.9 * rows[0][1],
        {"device": str(device), "amp": amp, "channels_last": channels_last, "batch": args.batch},
    )


if __name__ == "__main__":
    main()
