"""Per-slice embeddings of a trained 2D / 2.5D run for the sequence model (DESIGN §4; ``rsna19 embed``).

``extract_embeddings(run_dir, fold)`` loads fold k's checkpoint like :func:`rsna19.inference.predict.predict`,
reads every slice of the requested splits with the run's own input mapping, and stores the model's pooled
features (``model.features(x)``: what its head sees) and its six logits (``model.head`` of those features), both
averaged over the TTA views, as described in :mod:`rsna19.data.embeddings`. All splits of fold k come from fold
k's model: the ``oof`` embeddings of the fold's held-out patients are never computed by a model that trained on
them.

Finished splits are skipped on re-run (the ``.json`` is written last); ``overwrite=True`` recomputes them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rsna19.config import from_dict
from rsna19.constants import CLASSES
from rsna19.data.datasets import SliceDataset, read_cache_index
from rsna19.data.embeddings import EMBED_COLUMNS, EMBED_SPLITS, embedding_paths, embeddings_complete
from rsna19.data.folds import read_folds, split_by_fold
from rsna19.data.transforms import MultiWindow, decode_image
from rsna19.errors import UserError
from rsna19.inference.predict import DEFAULT_TTA, TTA, autocast, parse_tta, resolve_amp
from rsna19.nets import build_model, get_model_spec
from rsna19.training.checkpoint import load_checkpoint
from rsna19.training.config import TrainConfig
from rsna19.training.distributed import resolve_device
from rsna19.utils.atomic import atomic_path, write_parquet, write_text

log = logging.getLogger(__name__)


@torch.no_grad()
def embed_features(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    batch_size: int = 32,
    tta: Sequence[str] = ("none",),
    amp: str = "none",
    num_workers: int = 0,
    channels_last: bool = False,
    progress: bool = False,
    desc: str = "embed",
) -> tuple[np.ndarray, np.ndarray]:
    """``model.features`` of every item of ``dataset`` and the logits of its ``head``, each averaged over TTA views.

    Returns:
        features (len(dataset), D) and logits (len(dataset), 6), float32 in dataset order.

    Raises:
        UserError: the model has no ``features`` method giving one vector per item, or no ``head``.
    """
    if not callable(getattr(model, "features", None)) or not callable(getattr(model, "head", None)):
        raise UserError(f"{type(model).__name__} has no features() and head(): it cannot give embeddings")
    model.eval()
    views = parse_tta(tta)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    feats: list[np.ndarray] = []
    logits: list[np.ndarray] = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = decode_image(batch["image"].to(device, non_blocking=True))
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        acc_f = acc_l = None
        for v in views:
            with autocast(device, amp):
                f = model.features(TTA[v](x))
                z = model.head(f)
            if f.ndim != 2:
                raise UserError(f"{type(model).__name__}.features gives {tuple(f.shape)}, not one vector per slice")
            f, z = f.float(), z.float()
            acc_f = f if acc_f is None else acc_f + f
            acc_l = z if acc_l is None else acc_l + z
        feats.append((acc_f / len(views)).cpu().numpy())
        logits.append((acc_l / len(views)).cpu().numpy())
    if not feats:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0, len(CLASSES)), dtype=np.float32)
    return np.concatenate(feats), np.concatenate(logits)


def embedding_frame(rows: pd.DataFrame, fold: int, split: str, logits: np.ndarray | None = None) -> pd.DataFrame:
    """The ``embeddings_<split>.parquet`` table for ``rows`` of the cache index (labels kept where present).

    ``logits`` (len(rows), 6): the image model's TTA-averaged logits, stored as ``logit_<class>`` columns.
    """
    df = pd.DataFrame(
        {
            "sop_uid": rows["sop_uid"].astype(str).to_numpy(),
            "series_uid": rows["series_uid"].astype(str).to_numpy(),
            "study_uid": rows["study_uid"].astype(str).to_numpy(),
            "patient_id": rows["patient_id"].astype(str).to_numpy(),
            "slice_idx": rows["z"].to_numpy(dtype=np.int64),
            "fold": np.full(len(rows), fold, dtype=np.int64),
            "split": np.full(len(rows), split, dtype=object),
        }
    )
    assert list(df.columns) == list(EMBED_COLUMNS)
    if split != "test":
        for c in CLASSES:
            df[c] = rows[c].to_numpy(dtype=np.float64)
    if logits is not None:
        for i, c in enumerate(CLASSES):
            df[f"logit_{c}"] = logits[:, i].astype(np.float32)
    return df


def extract_embeddings(
    run_dir: str | os.PathLike[str],
    fold: int,
    splits: Sequence[str] = EMBED_SPLITS,
    tta: Sequence[str] = DEFAULT_TTA,
    checkpoint: str = "best",
    cache: str | None = None,
    folds: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    num_workers: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the embeddings of ``splits`` with fold ``fold``'s model of a 2D / 2.5D run.

    Args:
        run_dir: ``RUNS/<config name>`` or its ``fold_<k>``.
        fold: the fold k (its model embeds every split).
        splits: any of ``train`` (fold k's training patients), ``oof`` (its held-out patients), ``test``.
        tta: views averaged (``none``, ``hflip``, ``vflip``, ``transpose``).
        checkpoint: ``best`` or ``last``.
        cache, folds: override the paths recorded in the run's config.
        batch_size: defaults to the run's validation batch size.
        device: ``auto``, ``cpu`` or ``cuda``.
        num_workers: loader processes.
        dtype: ``float32`` or ``float16`` storage.
        overwrite: recompute splits that are already complete.
        progress: progress bars.

    Returns:
        ``{split: path of embeddings_<split>.npy}``.

    Raises:
        UserError: unknown split/checkpoint/dtype, a run of a family without per-slice features, missing paths,
            or a split with no slices.
    """
    if checkpoint not in ("best", "last"):
        raise UserError(f"--checkpoint must be best or last, got {checkpoint!r}")
    if dtype not in ("float32", "float16"):
        raise UserError(f"--dtype must be float32 or float16, got {dtype!r}")
    for s in splits:
        embedding_paths(".", s)  # validates the name
    run_dir = Path(run_dir)
    fold_dir = run_dir if run_dir.name == f"fold_{fold}" else run_dir / f"fold_{fold}"
    todo = [s for s in dict.fromkeys(splits) if overwrite or not embeddings_complete(fold_dir, s)]
    out = {s: embedding_paths(fold_dir, s)["npy"] for s in dict.fromkeys(splits)}
    if not todo:
        log.info("embeddings of %s (%s) are complete; nothing to do", fold_dir, ", ".join(out))
        return out

    ckpt_path = fold_dir / f"{checkpoint}.pt"
    state = load_checkpoint(ckpt_path)
    cfg = from_dict(TrainConfig, state["config"])
    spec = get_model_spec(state["model_name"])
    if spec.input_layout not in ("channels", "stack"):
        raise UserError(
            f"model {spec.name!r} ({spec.input_layout} input) gives no per-slice embeddings; use a 2D/2.5D run"
        )
    cache = cache or os.environ.get("RSNA19_CACHE") or cfg.data.cache
    if not cache:
        raise UserError("no cache path: pass --cache or set RSNA19_CACHE")
    index = read_cache_index(cache)
    if any(s != "test" for s in todo):
        folds_path = folds or os.environ.get("RSNA19_FOLDS") or cfg.data.folds
        if not folds_path:
            raise UserError("no folds path: pass --folds or set RSNA19_FOLDS")
        train_rows, val_rows = split_by_fold(index, read_folds(folds_path), fold)
    rows_of = {
        "train": lambda: train_rows,
        "oof": lambda: val_rows,
        "test": lambda: index[index["split"] == "test"].reset_index(drop=True),
    }

    dev = resolve_device(device)
    model = build_model(state["model_name"], **{**state["model_kwargs"], "pretrained": False, "weights": None})
    model.load_state_dict(state["model"])
    model.to(dev)
    channels_last = cfg.train.channels_last and dev.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    mapping = MultiWindow.from_state(state["hu_mapping"])
    bs = batch_size or cfg.train.val_batch_size or cfg.train.batch_size
    amp = resolve_amp(cfg.train.amp, dev)
    views = parse_tta(tta)

    for split in todo:
        rows = rows_of[split]().reset_index(drop=True)
        if rows.empty:
            raise UserError(f"no {split} slices to embed for fold {fold} in {cache}")
        ds = SliceDataset(
            cache,
            rows,
            mapping,
            slices=cfg.data.slices,
            layout=cfg.data.layout,
            size=cfg.data.crop,
            resize=cfg.data.resize,
            train=False,
            image_dtype=cfg.data.image_dtype,
        )
        feats, logits = embed_features(
            model, ds, dev, bs, views, amp, num_workers, channels_last, progress, f"embed {split}"
        )
        paths = embedding_paths(fold_dir, split)
        paths["json"].unlink(missing_ok=True)  # incomplete until the json is back
        with atomic_path(paths["npy"]) as tmp, open(tmp, "wb") as fh:
            np.save(fh, feats.astype(dtype))
        write_parquet(embedding_frame(rows, fold, split, logits), paths["parquet"])
        info = {
            "run": str(fold_dir),
            "model": cfg.name,
            "model_name": state["model_name"],
            "checkpoint": checkpoint,
            "epoch": int(state["epoch"]),
            "fold": fold,
            "split": split,
            "tta": views,
            "n": int(feats.shape[0]),
            "dim": int(feats.shape[1]),
            "dtype": dtype,
            "logits": True,  # logit_<class> columns in the parquet (older embeddings lack them)
        }
        write_text(json.dumps(info, indent=1) + "\n", paths["json"])
        log.info(
            "wrote %s: %d slices × %d features (TTA %s)", paths["npy"], feats.shape[0], feats.shape[1], ",".join(views)
        )
    return out
