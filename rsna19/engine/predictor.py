"""The predictor: a trained run (one or more folds of one model) on a device, ready to read out.

One class serves every caller that runs a trained model:

* ``rsna19 predict`` (:mod:`rsna19.inference.predict`) and ``rsna19 embed`` (:mod:`rsna19.engine.embed`) build it
  from a checkpoint (:meth:`Predictor.from_checkpoint`) and read a split of the cache;
* bundles (:mod:`rsna19.study.bundle`) build it from safetensors (:meth:`Predictor.from_weights`), and ``predict-study``
  calls :meth:`Predictor.predict_cache` on a freshly converted series: in memory, fold-averaged;
* Grad-CAM takes :meth:`Predictor.input_image`, the exact tensor the network sees.

The network is always rebuilt through the model registry from the name and arguments the trainer recorded
(:func:`build_net`), the items always come from the family's task (:meth:`Task.cache_dataset` or
:meth:`Task.prediction_data`), and the forward always goes through :func:`rsna19.engine.forward.predict_rows`, so
the same slice gets the same probability whichever door it came through. A sequence model's predictor holds its
image model's predictor (``upstream``): in memory, fold k's image model embeds the series for fold k's sequence
model, with the TTA views its training embeddings were made with.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from rsna19.core.config import from_dict
from rsna19.core.errors import UserError
from rsna19.engine.checkpoint import load_checkpoint
from rsna19.engine.config import TrainConfig
from rsna19.engine.forward import embed_rows, finish_rows, predict_rows
from rsna19.engine.runtime import Runtime, parse_tta, resolve_device
from rsna19.engine.tasks import SequenceTask, Task, get_task
from rsna19.nets import build_model


def build_net(
    model_name: str,
    kwargs: dict[str, Any],
    weights: dict[str, torch.Tensor],
    device: torch.device,
    channels_last: bool = False,
) -> nn.Module:
    """Rebuild a registered model from its name, builder arguments and state dict, in eval mode on ``device``.

    Raises:
        UserError: the weights do not fit the architecture.
    """
    model = build_model(model_name, **{**kwargs, "pretrained": False, "weights": None})
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UserError(f"the weights do not fit model {model_name!r}: {exc}") from None
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model.eval()


@dataclass
class Member:
    """One fold's network of a run.

    Attributes:
        fold: the fold k.
        net: the network, eval mode, on the predictor's device.
        hu_mapping: the run's HU → channel mapping state (None for models that read no images).
        epoch: the checkpoint's epoch (−1 when unknown).
    """

    fold: int
    net: nn.Module
    hu_mapping: dict[str, Any] | None
    epoch: int = -1


@dataclass
class Predictor:
    """A run's folds on one device, with the run's task, autocast rule, TTA views and batch size.

    Attributes:
        name: the run name (config stem).
        cfg: the run's resolved training config.
        model_name, model_kwargs: how the trainer built the network (registry name, builder arguments).
        members: one :class:`Member` per fold; predictions are averaged over them.
        rt: device, autocast mode, memory format.
        views: TTA views (``["none"]`` for tasks without TTA).
        batch_size: items per forward.
        num_workers: loader processes.
        upstream: a sequence model's image-model predictor (same folds), else None.
        embed_views: the TTA views the upstream embeddings were made with (sequence models).
    """

    name: str
    cfg: TrainConfig
    model_name: str
    model_kwargs: dict[str, Any]
    members: list[Member]
    rt: Runtime
    views: list[str]
    batch_size: int
    num_workers: int = 0
    upstream: Predictor | None = None
    embed_views: list[str] = field(default_factory=lambda: ["none"])
    task: Task = field(init=False)

    def __post_init__(self) -> None:
        self.task = get_task(self.cfg)
        if not self.task.uses_tta:
            self.views = ["none"]

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def create(
        cls,
        cfg: TrainConfig,
        model_name: str,
        model_kwargs: dict[str, Any],
        weights: Sequence[tuple[int, dict[str, torch.Tensor], dict[str, Any] | None, int]],
        device: str | torch.device = "auto",
        tta: Sequence[str] = ("none",),
        batch_size: int | None = None,
        num_workers: int | None = None,
        name: str | None = None,
    ) -> Predictor:
        """A predictor from state dicts: ``weights`` holds ``(fold, state dict, HU mapping state, epoch)`` per fold.

        ``num_workers`` defaults to the run's ``data.num_workers`` (its loader settings at training time).
        """
        dev = resolve_device(device) if isinstance(device, str) else device
        rt = Runtime.for_config(dev, cfg.train.amp, cfg.train.channels_last)
        members = [
            Member(int(k), build_net(model_name, model_kwargs, w, dev, rt.channels_last), hu, int(epoch))
            for k, w, hu, epoch in weights
        ]
        return cls(
            name=name or cfg.name,
            cfg=cfg,
            model_name=model_name,
            model_kwargs=dict(model_kwargs),
            members=members,
            rt=rt,
            views=parse_tta(tta),
            batch_size=batch_size or cfg.train.val_batch_size or cfg.train.batch_size,
            num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        )

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], **kwargs: Any) -> tuple[Predictor, dict[str, Any]]:
        """A one-fold predictor from a trainer checkpoint (``best.pt`` / ``last.pt``); also returns the checkpoint.

        Keyword arguments go to :meth:`create` (device, tta, batch_size, num_workers).
        """
        state = load_checkpoint(path)
        cfg = from_dict(TrainConfig, state["config"])
        weights = [(int(state["fold"]), state["model"], state["hu_mapping"], int(state["epoch"]))]
        return cls.create(cfg, state["model_name"], state["model_kwargs"], weights, **kwargs), state

    @property
    def folds(self) -> list[int]:
        """The members' folds."""
        return [m.fold for m in self.members]

    def member(self, fold: int) -> Member:
        """The member of fold ``fold``.

        Raises:
            UserError: no such fold.
        """
        for m in self.members:
            if m.fold == fold:
                return m
        raise UserError(f"{self.name}: no fold {fold} (folds {[m.fold for m in self.members]})")

    # ------------------------------------------------------------------------------------------- reading out
    def _read_out(
        self,
        loop: Callable[..., Any],
        member: Member,
        dataset: Dataset,
        n_rows: int,
        views: Sequence[str],
        desc: str | None,
    ) -> Any:
        """``loop`` (:func:`predict_rows` or :func:`embed_rows`) of one member with this predictor's settings."""
        args = (self.task, member.net, dataset, n_rows, self.rt, self.batch_size, views)
        return loop(*args, num_workers=self.num_workers, desc=desc)

    def predict_items(
        self, member: Member, dataset: Dataset, n_rows: int, progress: bool = False, desc: str = "predict"
    ) -> np.ndarray:
        """(n_rows, 6) float32 probabilities of one member on the task's items covering ``n_rows`` frame rows."""
        bar = desc if progress else None
        return finish_rows(*self._read_out(predict_rows, member, dataset, n_rows, self.views, bar))

    def embed_items(
        self,
        member: Member,
        dataset: Dataset,
        n_rows: int,
        views: Sequence[str] | None = None,
        progress: bool = False,
        desc: str = "embed",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-slice features (n_rows, D) and head logits (n_rows, 6) of one member (2D / 2.5D families)."""
        if not self.task.can_embed:
            raise UserError(f"{self.name}: model {self.model_name!r} gives no per-slice embeddings; use a 2D/2.5D run")
        views = parse_tta(views) if views is not None else self.views
        return self._read_out(embed_rows, member, dataset, n_rows, views, desc if progress else None)

    def cache_items(self, member: Member, cache: str | os.PathLike[str], rows: pd.DataFrame) -> Dataset:
        """The items of ``rows`` of a conversion cache for ``member`` (sequence models: embedded in memory)."""
        if self.task.reads_cache:
            assert member.hu_mapping is not None
            return self.task.cache_dataset(cache, rows, member.hu_mapping)
        if self.upstream is None:
            raise UserError(f"{self.name}: a {self.model_name!r} model needs its image model to predict new series")
        up = self.upstream.member(member.fold)
        feats, logits = self.upstream.embed_items(
            up, self.upstream.cache_items(up, cache, rows), len(rows), views=self.embed_views
        )
        assert isinstance(self.task, SequenceTask)
        return self.task.memory_dataset(rows, feats, logits, self.model_kwargs)

    def predict_cache(
        self, cache: str | os.PathLike[str], rows: pd.DataFrame, per_member: bool = False
    ) -> np.ndarray | dict[int, np.ndarray]:
        """Probabilities of ``rows`` of a conversion cache (cache-index rows: ``series_uid``, ``z``, ...).

        Returns:
            (len(rows), 6) float32 averaged over the members (folds), in ``rows`` order; with ``per_member``
            fold → (len(rows), 6).
        """
        rows = rows.reset_index(drop=True)
        out = {m.fold: self.predict_items(m, self.cache_items(m, cache, rows), len(rows)) for m in self.members}
        if per_member:
            return out
        return np.mean(np.stack(list(out.values())), axis=0, dtype=np.float64).astype(np.float32)

    def input_image(self, member: Member, cache: str | os.PathLike[str], rows: pd.DataFrame, i: int) -> torch.Tensor:
        """The image tensor (1, C, H, W) the network sees for row ``i`` (no TTA), on the device: for Grad-CAM.

        Raises:
            UserError: the family's items are not single images (slabs, sequences).
        """
        if self.cfg.data.layout != "channels":
            raise UserError(f"{self.name}: a {self.cfg.data.layout!r} model has no single-image input")
        assert member.hu_mapping is not None
        item = self.task.cache_dataset(cache, rows.reset_index(drop=True), member.hu_mapping)[i]
        return self.rt.image({"image": item["image"][None]})


def run_fold_dir(run_dir: str | os.PathLike[str], fold: int) -> Path:
    """``RUNS/<config>/fold_<k>`` from either the run folder or the fold folder itself."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.name == f"fold_{fold}" else run_dir / f"fold_{fold}"
