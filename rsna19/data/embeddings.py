"""Per-slice embeddings of a trained image model, and the per-series dataset of the sequence model.

``rsna19 embed RUN --fold k`` (:mod:`rsna19.engine.embed`) writes, per split, into ``RUNS/<config>/fold_<k>/``::

    embeddings_<split>.npy       (N, D) float32 (or float16) pooled features, TTA-averaged, row i ↔ parquet row i
    embeddings_<split>.parquet   sop_uid, series_uid, study_uid, patient_id, slice_idx, fold, split (+ 6 labels),
                                 logit_<class> × 6: the image model's TTA-averaged logits of the slice
    embeddings_<split>.json      what wrote them (checkpoint epoch, TTA, dim); written last: marks them complete

Splits: ``train`` (fold k's training patients), ``oof`` (fold k's held-out patients) and ``test``. Every split of
fold k comes from fold k's image model. A sequence model of fold k validates on fold k's ``oof`` and trains on the
other folds' ``oof`` (``data.embedding_source: oof``: held-out embeddings like the validation ones) or on fold k's
``train`` (``fold``: in-sample embeddings, cleaner than the held-out ones); see
:class:`rsna19.engine.tasks.SequenceTask`.

:class:`SequenceDataset` serves one series per item, slices in ``slice_idx`` order; :func:`collate_sequences`
pads a batch and gives the lengths the model packs with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from rsna19.core.constants import CLASSES, EMBED_SPLITS
from rsna19.core.errors import UserError

#: The image model's logits in ``embeddings_<split>.parquet`` (the sequence model's ``logit_skip`` base).
LOGIT_COLUMNS: tuple[str, ...] = tuple(f"logit_{c}" for c in CLASSES)

#: Metadata columns of ``embeddings_<split>.parquet``.
EMBED_COLUMNS: tuple[str, ...] = ("sop_uid", "series_uid", "study_uid", "patient_id", "slice_idx", "fold", "split")


def embedding_paths(fold_dir: str | os.PathLike[str], split: str) -> dict[str, Path]:
    """``npy``, ``parquet`` and ``json`` paths of one split's embeddings in a fold directory."""
    if split not in EMBED_SPLITS:
        raise UserError(f"unknown embedding split {split!r}; known: {', '.join(EMBED_SPLITS)}")
    base = Path(fold_dir)
    return {ext: base / f"embeddings_{split}.{ext}" for ext in ("npy", "parquet", "json")}


def embeddings_complete(fold_dir: str | os.PathLike[str], split: str) -> bool:
    """Whether one split's embeddings are complete and current (older ones, without the logits, are not)."""
    path = embedding_paths(fold_dir, split)["json"]
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text(encoding="utf-8")).get("logits", False))
    except (OSError, ValueError):
        return False


def read_embeddings(
    fold_dir: str | os.PathLike[str], split: str, mmap: bool = True
) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """The rows, features (N, D) and info of one split written by ``rsna19 embed``.

    Raises:
        UserError: missing or incomplete files, or rows and features that disagree.
    """
    paths = embedding_paths(fold_dir, split)
    if not paths["json"].is_file():
        raise UserError(f"no complete {split} embeddings in {fold_dir} (run `rsna19 embed RUN --fold k` first)")
    info = json.loads(paths["json"].read_text(encoding="utf-8"))
    frame = pd.read_parquet(paths["parquet"])
    try:
        features = np.load(paths["npy"], mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:  # an object array (a pickle inside .npy) or a damaged header: never unpickled
        raise UserError(f"cannot read embeddings {paths['npy']}: {exc}") from None
    if features.ndim != 2 or len(features) != len(frame):
        raise UserError(f"{paths['npy']}: shape {features.shape} does not match {len(frame)} rows")
    return frame, features, info


class SequenceDataset(Dataset):
    """Whole series of embeddings in slice order.

    Args:
        frame: one row a slice: ``series_uid``, ``slice_idx`` (+ the six labels for training, + ``logit_<class>``).
        features: (len(frame), D) embeddings, row-aligned with ``frame`` (a memory map is fine).
        with_logits: also serve the image model's logits (the ``logit_<class>`` columns) as ``base``.

    Each item is a dict: ``x`` (T, D) float32, ``target`` (T, 6) float32 (NaN where unknown), ``rows`` (T,)
    int64 frame rows in slice order, ``index`` the series number, and with ``with_logits`` ``base`` (T, 6).

    Raises:
        UserError: rows and features disagree, or ``with_logits`` and the frame has no logit columns.
    """

    def __init__(self, frame: pd.DataFrame, features: np.ndarray, with_logits: bool = False) -> None:
        if len(frame) != len(features):
            raise UserError(f"{len(frame)} rows but {len(features)} embeddings")
        self.frame = frame.reset_index(drop=True)
        self.features = features
        self.logits: np.ndarray | None = None
        if with_logits:
            missing = [c for c in LOGIT_COLUMNS if c not in self.frame.columns]
            if missing:
                raise UserError(
                    "these embeddings carry no image-model logits (written by an older rsna19 embed): recompute "
                    "them with `rsna19 embed RUN --fold k --overwrite`, or set model.args.logit_skip=false"
                )
            self.logits = self.frame[list(LOGIT_COLUMNS)].to_numpy(dtype=np.float32)
        if all(c in self.frame.columns for c in CLASSES):
            self.targets = self.frame[list(CLASSES)].to_numpy(dtype=np.float32)
        else:
            self.targets = np.full((len(self.frame), len(CLASSES)), np.nan, dtype=np.float32)
        order = self.frame.sort_values(["series_uid", "slice_idx"], kind="stable")
        groups = order.groupby("series_uid", sort=True).indices
        pos = order.index.to_numpy()
        self.series = list(groups)
        self.rows = [pos[idx] for idx in groups.values()]  # frame rows of each series in slice order

    @property
    def dim(self) -> int:
        """Embedding size D."""
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rows = self.rows[index]
        x = np.asarray(self.features[rows], dtype=np.float32)
        item = {
            "x": torch.from_numpy(x),
            "target": torch.from_numpy(self.targets[rows]),
            "rows": torch.from_numpy(rows.astype(np.int64)),
            "index": index,
        }
        if self.logits is not None:
            item["base"] = torch.from_numpy(self.logits[rows])
        return item


def collate_sequences(items: list[dict[str, Any]], pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`SequenceDataset` items to the longest (or ``pad_to``) series.

    Returns:
        ``x`` (B, T, D) zero-padded, ``lengths`` (B,), ``mask`` (B, T) bool real slices, ``target`` (B, T, 6) NaN
        at padding, ``rows`` (B, T) −1 at padding, ``index`` (B,), and ``base`` (B, T, 6) zero-padded when the
        items have it.
    """
    lengths = torch.tensor([len(it["x"]) for it in items], dtype=torch.long)
    t = max(int(lengths.max()), pad_to or 0)
    b, d = len(items), items[0]["x"].shape[1]
    x = torch.zeros(b, t, d, dtype=torch.float32)
    target = torch.full((b, t, len(CLASSES)), float("nan"), dtype=torch.float32)
    rows = torch.full((b, t), -1, dtype=torch.long)
    for i, it in enumerate(items):
        n = len(it["x"])
        x[i, :n] = it["x"]
        target[i, :n] = it["target"]
        rows[i, :n] = it["rows"]
    mask = torch.arange(t)[None, :] < lengths[:, None]
    out = {
        "x": x,
        "lengths": lengths,
        "mask": mask,
        "target": target,
        "rows": rows,
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
    }
    if "base" in items[0]:
        base = torch.zeros(b, t, len(CLASSES), dtype=torch.float32)
        for i, it in enumerate(items):
            base[i, : len(it["base"])] = it["base"]
        out["base"] = base
    return out
