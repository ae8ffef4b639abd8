"""The one read-out loop: a family's :class:`~rsna19.engine.tasks.Task` over a dataset → one row per slice.

Validation during training, ``rsna19 predict``, ``rsna19 embed``, bundles and ``predict-study`` all come through
:func:`predict_rows` / :func:`embed_rows`; what differs between families (what an item is, which head is read, how
TTA applies) is the task's :meth:`~rsna19.engine.tasks.Task.probs` / :meth:`~rsna19.engine.tasks.Task.embed`.

Every read-out is a list of (frame row, values) pairs per item; the loops sum them per row (overlapping slab windows,
TTA views) and :func:`finish_rows` averages, so each slice of the frame gets exactly one prediction whatever the item
is. Under DDP each process sums its own items and the sums are added.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from rsna19.core.constants import CLASSES
from rsna19.engine.runtime import Runtime

if TYPE_CHECKING:  # annotations only: tasks import this module
    from rsna19.engine.tasks import Task


def _loader(task: Task, dataset: Dataset, items: Sequence[int] | None, batch_size: int, workers: int) -> DataLoader:
    subset = Subset(dataset, list(range(len(dataset))) if items is None else list(items))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=task.collate)


@torch.no_grad()
def predict_rows(
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    n_rows: int,
    rt: Runtime,
    batch_size: int = 32,
    views: Sequence[str] = ("none",),
    items: Sequence[int] | None = None,
    num_workers: int = 0,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row sums of the probabilities of ``items`` of ``dataset`` (all by default), and how many there were.

    Args:
        task: the model family's task (item layout, head, TTA rule).
        model: the network, eval mode is set here.
        dataset: items covering the ``n_rows`` rows of a frame (each item says which rows it predicts).
        n_rows: rows of the frame.
        rt: device / autocast / memory format.
        batch_size: items per forward.
        views: TTA views (ignored by tasks without TTA).
        items: the item indices to run (this process's share under DDP).
        num_workers: loader processes.
        desc: the progress bar's label; None shows no bar.

    Returns:
        ``(total (n_rows, 6) float64, count (n_rows,) float64)``: add these over processes, then
        :func:`finish_rows`.
    """
    model.eval()
    views = list(views) if task.uses_tta else ["none"]
    total = np.zeros((n_rows, len(CLASSES)), dtype=np.float64)
    count = np.zeros(n_rows, dtype=np.float64)
    for batch in tqdm(_loader(task, dataset, items, batch_size, num_workers), desc=desc, disable=desc is None):
        rows, probs = task.probs(model, batch, rt, views)
        keep = rows >= 0
        np.add.at(total, rows[keep], probs[keep].astype(np.float64))
        np.add.at(count, rows[keep], 1.0)
    return total, count


def finish_rows(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Mean value per row, (n_rows, K) float32.

    Raises:
        ValueError: a row that no item predicted (the items would not cover the frame).
    """
    missing = np.flatnonzero(count <= 0)
    if len(missing):
        raise ValueError(f"{len(missing)} of {len(count)} slices got no prediction, e.g. row {missing[0]}")
    return (total / count[:, None]).astype(np.float32)


@torch.no_grad()
def embed_rows(
    task: Task,
    model: nn.Module,
    dataset: Dataset,
    n_rows: int,
    rt: Runtime,
    batch_size: int = 32,
    views: Sequence[str] = ("none",),
    num_workers: int = 0,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice features (what the head sees) and head logits of every row, averaged over the TTA views.

    Returns:
        ``(features (n_rows, D) float32, logits (n_rows, 6) float32)`` in frame row order.

    Raises:
        UserError: the task's family gives no per-slice embeddings (see :attr:`Task.can_embed`).
    """
    model.eval()
    feats: np.ndarray | None = None
    logits = np.zeros((n_rows, len(CLASSES)), dtype=np.float64)
    count = np.zeros(n_rows, dtype=np.float64)
    for batch in tqdm(_loader(task, dataset, None, batch_size, num_workers), desc=desc, disable=desc is None):
        rows, f, z = task.embed(model, batch, rt, views)
        if feats is None:
            feats = np.zeros((n_rows, f.shape[-1]), dtype=np.float64)
        np.add.at(feats, rows, f.astype(np.float64))
        np.add.at(logits, rows, z.astype(np.float64))
        np.add.at(count, rows, 1.0)
    if feats is None:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0, len(CLASSES)), dtype=np.float32)
    return finish_rows(feats, count), finish_rows(logits, count)
