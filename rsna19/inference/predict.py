"""Out-of-fold and test prediction of a trained run, with deterministic TTA (DESIGN §6).

``predict(run_dir, fold, split)`` loads ``best.pt`` (or ``last.pt``) of ``RUNS/<config>/fold_<k>``, rebuilds the
model and the input mapping from the checkpoint, predicts every slice of the fold's held-out patients (``oof``)
or of the test split (``test``), averages the probabilities over the TTA views and writes
``oof.parquet`` / ``test.parquet`` in the schema of docs/contracts.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rsna19.config import from_dict
from rsna19.constants import CLASSES, DEFAULT_TTA, PROB_COLUMNS
from rsna19.data.datasets import SliceDataset
from rsna19.data.transforms import MultiWindow, decode_image
from rsna19.errors import UserError
from rsna19.nets import build_model
from rsna19.training.checkpoint import load_checkpoint
from rsna19.training.config import TrainConfig
from rsna19.training.distributed import resolve_device
from rsna19.utils.atomic import write_parquet

log = logging.getLogger(__name__)

#: Test-time views: each maps a batch (..., H, W) to a batch of the same shape, and each is its own inverse.
TTA: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": lambda x: x,
    "hflip": lambda x: x.flip(-1),
    "vflip": lambda x: x.flip(-2),
    "transpose": lambda x: x.transpose(-1, -2),
}
_TTA_ALIASES = {"identity": "none"}


def parse_tta(names: Sequence[str]) -> list[str]:
    """Check TTA names (``identity`` is an alias of ``none``); the order is kept, duplicates dropped.

    Raises:
        UserError: an unknown name.
    """
    out: list[str] = []
    for n in names:
        n = _TTA_ALIASES.get(n, n)
        if n not in TTA:
            raise UserError(f"unknown TTA {n!r}; known: {', '.join(TTA)}")
        if n not in out:
            out.append(n)
    if not out:
        raise UserError("at least one TTA view is needed (use 'none' for no TTA)")
    return out


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` for ``amp`` in ``bf16``/``fp16``, or a no-op for ``none``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto`` → ``bf16`` on a GPU that has it, else ``none``; ``fp16`` needs a GPU.

    Raises:
        UserError: fp16 asked for on CPU.
    """
    if amp == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp == "fp16" and device.type != "cuda":
        raise UserError("train.amp fp16 needs a GPU; use bf16 or none on CPU")
    return amp


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 32,
    tta: Sequence[str] = ("none",),
    amp: str = "none",
    num_workers: int = 0,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Sigmoid probabilities of ``model`` on every item of ``dataset``, averaged over the TTA views.

    Returns:
        (len(dataset), 6) float32 in dataset order.
    """
    model.eval()
    views = parse_tta(tta)
    out = np.zeros((len(dataset), len(CLASSES)), dtype=np.float32)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    pos = 0
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = decode_image(batch["image"].to(device, non_blocking=True))
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        acc = torch.zeros(x.shape[0], len(CLASSES), device=device)
        for v in views:
            with autocast(device, amp):
                logits = model(TTA[v](x))
            acc += torch.sigmoid(logits.float())
        out[pos : pos + len(x)] = (acc / len(views)).cpu().numpy()
        pos += len(x)
    return out


def prediction_frame(rows: pd.DataFrame, probs: np.ndarray, fold: int, model_name: str, labels: bool) -> pd.DataFrame:
    """The prediction parquet table (docs/contracts.md) for ``rows`` of the cache index."""
    df = pd.DataFrame(
        {
            "sop_uid": rows["sop_uid"].astype(str).to_numpy(),
            "series_uid": rows["series_uid"].astype(str).to_numpy(),
            "study_uid": rows["study_uid"].astype(str).to_numpy(),
            "patient_id": rows["patient_id"].astype(str).to_numpy(),
            "slice_idx": rows["z"].to_numpy(dtype=np.int64),
            "fold": np.full(len(rows), fold, dtype=np.int64),
            "model": np.full(len(rows), model_name, dtype=object),
        }
    )
    for i, col in enumerate(PROB_COLUMNS):
        df[col] = probs[:, i].astype(np.float64)
    if labels:
        for c in CLASSES:
            df[c] = rows[c].to_numpy(dtype=np.float64)
    return df


def model_from_state(
    model_name: str,
    kwargs: dict[str, Any],
    weights: dict[str, torch.Tensor],
    device: torch.device,
    channels_last: bool = False,
) -> nn.Module:
    """Rebuild a registered model from its name, builder arguments and state dict, in eval mode on ``device``.

    Shared by :func:`predict` (checkpoints) and :mod:`rsna19.bundle` (safetensors), so both build the same net.
    """
    model = build_model(model_name, **{**kwargs, "pretrained": False, "weights": None})
    model.load_state_dict(weights)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval()


def prediction_dataset(
    cfg: TrainConfig, hu_mapping: dict[str, Any], cache: str | os.PathLike[str], rows: pd.DataFrame
) -> SliceDataset:
    """The evaluation dataset of a run: the run's slices, layout, resize and centre crop, no augmentation.

    Args:
        cfg: the run's resolved config.
        hu_mapping: the run's :meth:`MultiWindow.state` (windows and fitted CDF knots).
        cache: a conversion cache holding the rows' series.
        rows: cache-index rows (``series_uid``, ``z``; labels if known).
    """
    return SliceDataset(
        cache,
        rows,
        MultiWindow.from_state(hu_mapping),
        slices=cfg.data.slices,
        layout=cfg.data.layout,
        size=cfg.data.crop,
        resize=cfg.data.resize,
        train=False,
        image_dtype=cfg.data.image_dtype,
    )


def predict(
    run_dir: str | os.PathLike[str],
    fold: int,
    split: str = "oof",
    tta: Sequence[str] = DEFAULT_TTA,
    checkpoint: str = "best",
    cache: str | None = None,
    folds: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Predict the out-of-fold or test slices of one fold's run and write the parquet.

    Args:
        run_dir: ``RUNS/<config name>`` or ``RUNS/<config name>/fold_<k>``.
        fold: the fold ``k``.
        split: ``oof`` (the fold's held-out training patients) or ``test`` (``split == "test"`` of the cache).
        tta: views to average (``none``, ``hflip``, ``vflip``, ``transpose``).
        checkpoint: ``best`` or ``last``.
        cache, folds: override the paths recorded in the run's config.
        batch_size: defaults to the run's validation batch size.
        device: ``auto``, ``cpu`` or ``cuda``.
        num_workers: loader processes.
        progress: show a progress bar.
        out: output path; defaults to ``<fold dir>/<split>.parquet``.

    Returns:
        The written parquet path.

    Raises:
        UserError: unknown split/checkpoint, a missing run or checkpoint, no slices to predict.
    """
    if split not in ("oof", "test"):
        raise UserError(f"--split must be oof or test, got {split!r}")
    if checkpoint not in ("best", "last"):
        raise UserError(f"--checkpoint must be best or last, got {checkpoint!r}")
    run_dir = Path(run_dir)
    fold_dir = run_dir if run_dir.name == f"fold_{fold}" else run_dir / f"fold_{fold}"
    state = load_checkpoint(fold_dir / f"{checkpoint}.pt")
    cfg = from_dict(TrainConfig, state["config"])
    # The family's task says what the items are and how their outputs become one prediction per slice.
    from rsna19.training.tasks import Runtime, finish_rows, get_task, predict_rows

    task = get_task(cfg)
    rows, ds = task.prediction_data(state, fold_dir, fold, split, cache, folds)
    dev = resolve_device(device)
    channels_last = cfg.train.channels_last and dev.type == "cuda"
    model = model_from_state(state["model_name"], state["model_kwargs"], state["model"], dev, channels_last)
    bs = batch_size or cfg.train.val_batch_size or cfg.train.batch_size
    rt = Runtime(dev, resolve_amp(cfg.train.amp, dev), channels_last)
    total, count = predict_rows(
        task,
        model,
        ds,
        len(rows),
        rt,
        bs,
        parse_tta(tta),
        num_workers=num_workers,
        progress=progress,
        desc=f"{split} f{fold}",
    )
    probs = finish_rows(total, count)
    if not task.uses_tta:
        tta = ("none",)
    df = prediction_frame(rows, probs, fold, cfg.name, labels=split == "oof")
    path = Path(out) if out else fold_dir / f"{split}.parquet"
    write_parquet(df, path)
    log.info(
        "wrote %s: %d slices, TTA %s, checkpoint %s (epoch %d)",
        path,
        len(df),
        ",".join(tta),
        checkpoint,
        state["epoch"],
    )
    return path
