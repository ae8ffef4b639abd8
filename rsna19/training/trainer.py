"""The trainer shared by every model family.

``train(cfg, fold)`` trains on the training-split slices of every patient not in fold ``k`` and validates on
all slices of fold ``k``'s patients each epoch (weighted log loss, no TTA). What an item is, its loss and how its
outputs become one prediction per slice depend on the model family (:mod:`rsna19.engine.tasks`). It writes into
``RUNS/<config name>/fold_<k>/``: the resolved ``config.yaml``, ``log.csv`` (one row an epoch), ``last.pt``
(every epoch, everything a resume needs), ``best.pt`` (the weights of the best validation loss, without optimizer
state) and ``curves.png`` (the losses per epoch, drawn at the end).

Reproducibility: every random draw of an epoch comes from ``(seed, epoch)`` — the slice sample, the
augmentation of each sample (seeded by its index) and torch's generator (dropout) — so a run killed after
epoch ``e`` and resumed from ``last.pt`` continues exactly as the uninterrupted run would (bit-identical on
CPU), and two runs of one config give identical predictions.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from rsna19.core.atomic import write_csv
from rsna19.core.config import save_config, to_dict
from rsna19.core.constants import CLASSES
from rsna19.core.cv2_threads import cv2
from rsna19.core.errors import UserError
from rsna19.core.metrics import per_class_log_loss, weighted_log_loss
from rsna19.data.sampler import epoch_sampler
from rsna19.engine.checkpoint import load_checkpoint, save_checkpoint, unwrap
from rsna19.engine.config import TrainConfig, config_diff, model_kwargs
from rsna19.engine.embed import ensure_embeddings
from rsna19.engine.forward import finish_rows, predict_rows
from rsna19.engine.runtime import Runtime
from rsna19.engine.tasks import get_task
from rsna19.nets import build_model
from rsna19.training.distributed import (
    DistInfo,
    all_gather_object,
    barrier,
    broadcast_buffers,
    init_distributed,
    mean_across,
    shutdown,
)
from rsna19.viz.plots import write_training_curves

log = logging.getLogger(__name__)

#: Checkpoint keys only ``last.pt`` keeps: what resuming needs and predicting does not.
RESUME_ONLY_KEYS = frozenset({"optimizer", "scheduler", "scaler", "torch_rng"})

LOG_COLUMNS: tuple[str, ...] = ("epoch", "train_loss", "val_wll", *(f"val_loss_{c}" for c in CLASSES), "lr", "time_s")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_indices(n: int, samples: int | None, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This process's training rows for ``epoch``: a seeded shuffle, cut (or repeated) to ``samples``.

    The order is a function of ``(seed, epoch)`` only; it is padded to a multiple of ``world`` and dealt out
    round-robin, so every process gets the same number of batches (like ``DistributedSampler``).
    """
    rng = np.random.default_rng([seed, epoch])
    want = samples or n
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(want / n))])[:want]
    pad = (-len(order)) % world
    order = np.concatenate([order, order[:pad]])
    return order[rank::world]


def _worker_init(worker_id: int) -> None:
    # Each loader process: one OpenCV thread (the loader parallelism is the processes) and fresh seeds.
    cv2.setNumThreads(1)
    info = torch.utils.data.get_worker_info()
    seed = (info.seed if info is not None else worker_id) % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Backbone and head parameters as two groups (the backbone can then be frozen by its lr factor)."""
    backbone = {id(p) for p in getattr(model, "backbone", nn.Identity()).parameters()}
    groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
    for p in model.parameters():
        if p.requires_grad:
            groups["backbone" if id(p) in backbone else "head"].append(p)
    return [{"params": ps, "name": name, "weight_decay": weight_decay} for name, ps in groups.items() if ps]


def effective_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """The base learning rate of a run on ``world_size`` processes: ``optim.lr``, × world size with
    ``optim.lr_scaling: linear`` (see :class:`rsna19.engine.config.OptimConfig`)."""
    return cfg.optim.lr * (world_size if cfg.optim.lr_scaling == "linear" else 1)


def build_optimizer(cfg: TrainConfig, model: nn.Module, world_size: int = 1) -> torch.optim.Optimizer:
    """AdamW or RAdam over the backbone/head parameter groups, at :func:`effective_lr`."""
    groups = _param_groups(model, cfg.optim.weight_decay)
    lr = effective_lr(cfg, world_size)
    if cfg.optim.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.RAdam(groups, lr=lr, decoupled_weight_decay=True)


def lr_factor(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (linear warm-up, then cosine / one-cycle / constant)."""
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warm = cfg.sched.warmup_epochs * steps_per_epoch
    floor = cfg.sched.min_lr_ratio
    if cfg.sched.name == "onecycle":
        # One cycle: warm-up from lr/25 over ~30 % of the run (or the set warm-up), cosine down to the floor.
        warm = warm or 0.3 * total
        if step < warm:
            start = 1 / 25
            return start + (1 - start) * 0.5 * (1 - math.cos(math.pi * step / warm))
    elif step < warm:
        return (step + 1) / (warm + 1)
    if cfg.sched.name == "constant":
        return 1.0
    t = min(1.0, (step - warm) / max(1.0, total - warm))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


class Trainer:
    """Trains one fold of one config; see the module docstring. Use :func:`train`."""

    def __init__(self, cfg: TrainConfig, fold: int, dist: DistInfo) -> None:
        self.cfg = cfg
        self.fold = fold
        self.dist = dist
        self.device = dist.device
        assert cfg.runs and cfg.data.cache and cfg.data.folds
        self.run_dir = Path(cfg.runs) / cfg.name / f"fold_{fold}"
        self.task = get_task(cfg)
        self.rt = Runtime.for_config(self.device, cfg.train.amp, cfg.train.channels_last)
        self.amp, self.channels_last = self.rt.amp, self.rt.channels_last
        seed_everything(cfg.train.seed)
        if cfg.train.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)

        if dist.is_main:  # what the task reads from other runs (a sequence model: its image run's embeddings)
            needs = self.task.required_embeddings(cfg.runs, fold, ())
            ensure_embeddings(needs, cfg.data.cache, cfg.data.folds, str(self.device), progress=cfg.train.progress)
        barrier()
        data = self.task.fold_data(fold, self.device, dist.is_main)
        # Preparing the data may draw from the RNGs (e.g. a sequence model computing missing embeddings iterates a
        # DataLoader, which draws its base seed): seed again, so the model's init does not depend on what was cached.
        seed_everything(cfg.train.seed)
        self.train_ds, self.val_ds, self.val_frame = data.train, data.val, data.val_frame
        self.hu_mapping = data.mapping

        self.model_name = cfg.model.name
        self.model_kwargs = model_kwargs(cfg)
        clash = {k for k, v in data.model_kwargs.items() if k in cfg.model.args and cfg.model.args[k] != v}
        if clash:
            raise UserError(f"model.args {', '.join(sorted(clash))} disagree with the data ({data.model_kwargs})")
        self.model_kwargs.update(data.model_kwargs)
        model = self.task.prepare_model(build_model(self.model_name, **self.model_kwargs)).to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = build_optimizer(cfg, model, dist.world_size)
        n_epoch = cfg.data.samples_per_epoch or len(self.train_ds)
        self.steps_per_epoch = math.ceil(math.ceil(n_epoch / dist.world_size) / cfg.train.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, [self._group_lambda(g["name"]) for g in self.optimizer.param_groups]
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.net: nn.Module = (
            DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if dist.enabled
            else model
        )
        self.start_epoch = 0
        self.best_wll = math.inf
        self.log_rows: list[dict[str, Any]] = []

    def _group_lambda(self, group: str):  # noqa: ANN202 - a closure for LambdaLR
        def f(step: int) -> float:
            factor = lr_factor(self.cfg, step, self.steps_per_epoch)
            frozen = step < self.cfg.train.freeze_backbone_epochs * self.steps_per_epoch
            # Frozen backbone: its learning rate is 0 (gradients still flow, which keeps DDP simple).
            return 0.0 if group == "backbone" and frozen else factor

        return f

    # ---------------------------------------------------------------- checkpoints
    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_kwargs": self.model_kwargs,
            "config": to_dict(self.cfg),
            "seed": self.cfg.train.seed,
            "fold": self.fold,
            "epoch": epoch,
            "best_wll": self.best_wll,
            "hu_mapping": self.hu_mapping.state() if self.hu_mapping is not None else None,
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def maybe_resume(self) -> None:
        """Continue from ``last.pt`` when it exists and was written by the same config.

        Raises:
            UserError: ``last.pt`` exists but its config differs (names the differing keys).
        """
        path = self.run_dir / "last.pt"
        if not path.is_file():
            return
        state = load_checkpoint(path, map_location=self.device)
        diff = config_diff(state["config"], to_dict(self.cfg))
        if diff or state.get("fold") != self.fold:
            raise UserError(
                f"{path} was written with a different config (differs in: {', '.join(diff) or 'fold'}); "
                "delete the run directory or give the config another name"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epoch"]) + 1
        self.best_wll = float(state["best_wll"])
        log_path = self.run_dir / "log.csv"
        if log_path.is_file():
            rows = pd.read_csv(log_path)
            self.log_rows = rows[rows["epoch"] < self.start_epoch].to_dict("records")
        if self.dist.is_main:
            log.info("resuming %s from epoch %d (best val wll %.5f)", self.run_dir, self.start_epoch, self.best_wll)

    # ---------------------------------------------------------------- loop
    def train_epoch(self, epoch: int) -> float:
        """One pass over this epoch's sample; returns the mean training loss over all processes."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed * 1000 + epoch)  # dropout etc.: a function of (seed, epoch)
        if hasattr(self.train_ds, "set_epoch"):
            self.train_ds.set_epoch(epoch)
        sampler = epoch_sampler(cfg.data, self.train_ds, epoch_indices)  # data.sampler: random | blocked
        idx = sampler(
            len(self.train_ds), cfg.data.samples_per_epoch, cfg.train.seed, epoch, self.dist.rank, self.dist.world_size
        )
        loader = DataLoader(
            Subset(self.train_ds, idx.tolist()),
            batch_size=cfg.train.batch_size,
            shuffle=False,
            num_workers=cfg.data.num_workers,
            worker_init_fn=_worker_init,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            collate_fn=self.task.collate,
        )
        self.net.train()
        total, count = 0.0, 0
        bar = tqdm(
            loader,
            desc=f"{cfg.name} f{self.fold} e{epoch}",
            disable=not (cfg.train.progress and self.dist.is_main),
            leave=False,
        )
        for batch in bar:
            loss, n = self.task.loss(self.net, batch, self.rt)  # n: labelled slices the loss averages over
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if cfg.optim.clip_grad:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            total += float(loss.detach()) * n
            count += n
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        return mean_across(total / max(count, 1))

    def validate(self) -> np.ndarray:
        """Probabilities of every validation slice (no TTA) in ``val_frame`` order, over all processes.

        Each process predicts every ``world``-th item (a slice, a slab window or a series) and sums its
        probabilities per slice; the sums of all processes are added, then averaged per slice.
        """
        broadcast_buffers(unwrap(self.model))  # every process validates rank 0's model (BatchNorm statistics)
        total, count = predict_rows(
            self.task,
            unwrap(self.model),
            self.val_ds,
            len(self.val_frame),
            self.rt,
            self.cfg.train.val_batch_size or self.cfg.train.batch_size,
            ("none",),
            items=range(self.dist.rank, len(self.val_ds), self.dist.world_size),
            num_workers=self.cfg.data.num_workers,
            desc="val" if self.cfg.train.progress and self.dist.is_main else None,
        )
        parts = all_gather_object((total, count))
        return finish_rows(sum(p[0] for p in parts), sum(p[1] for p in parts))

    def fit(self) -> Path:
        """Train the remaining epochs; returns the run directory."""
        cfg = self.cfg
        self.maybe_resume()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        if self.start_epoch >= cfg.train.epochs:
            log.info("%s is complete (%d epochs); nothing to do", self.run_dir, cfg.train.epochs)
        y_val = self.val_frame[list(CLASSES)].to_numpy(dtype=np.float64)
        for epoch in range(self.start_epoch, cfg.train.epochs):
            t0 = time.time()
            train_loss = self.train_epoch(epoch)
            last = epoch == cfg.train.epochs - 1
            probs = self.validate() if last or (epoch + 1) % max(cfg.train.val_every, 1) == 0 else None
            if self.dist.is_main:
                wll = weighted_log_loss(y_val, probs) if probs is not None else math.nan
                per_class = per_class_log_loss(y_val, probs) if probs is not None else dict.fromkeys(CLASSES, math.nan)
                row = {"epoch": epoch, "train_loss": train_loss, "val_wll": wll}
                row.update({f"val_loss_{c}": per_class[c] for c in CLASSES})
                row.update({"lr": self.optimizer.param_groups[-1]["lr"], "time_s": time.time() - t0})
                self.log_rows.append(row)
                improved = wll < self.best_wll
                if improved:
                    self.best_wll = wll
                state = self._state(epoch)
                if improved:
                    # best.pt serves prediction, embedding and bundling only: without the optimizer, scheduler,
                    # scaler and RNG state it is about a third of last.pt's size (Adam keeps two moments a weight).
                    save_checkpoint(
                        {k: v for k, v in state.items() if k not in RESUME_ONLY_KEYS}, self.run_dir / "best.pt"
                    )
                # last.pt after best.pt and log.csv: a run killed in between redoes this epoch (resume drops log
                # rows from this epoch on) rather than losing its best model or its log row.
                write_csv(pd.DataFrame(self.log_rows, columns=list(LOG_COLUMNS)), self.run_dir / "log.csv")
                save_checkpoint(state, self.run_dir / "last.pt")
                log.info(
                    "%s fold %d epoch %d: train %.4f val wll %.4f%s (%.1fs)",
                    cfg.name,
                    self.fold,
                    epoch,
                    train_loss,
                    wll,
                    " *" if improved else "",
                    row["time_s"],
                )
            barrier()
        if self.dist.is_main:  # curves.png: log.csv drawn once at the end (~0.3 s CPU a plot); a failure only warns
            write_training_curves(self.run_dir, f"{cfg.name} fold {self.fold}")
        return self.run_dir


def train(cfg: TrainConfig, fold: int) -> Path:
    """Train fold ``fold`` of ``cfg`` (paths already resolved); under torchrun, with DDP.

    Returns:
        ``RUNS/<config name>/fold_<k>``.
    """
    dist = init_distributed(cfg.train.device)
    try:
        run_dir = Trainer(cfg, fold, dist).fit()
        # Every rank finishes before the group is torn down: under load a gloo rank still talking to a peer that
        # already destroyed the group aborted ("terminate called without an active exception", seen in CI-like runs).
        barrier()
        return run_dir
    finally:
        shutdown()
