"""Per-family tasks: how a model family is fed, what it is trained on, and how it is read out (DESIGN §4–§6).

The trainer (:mod:`rsna19.training.trainer`) and ``rsna19 predict`` (:mod:`rsna19.inference.predict`) are the
same for every family; what differs lives here, in one :class:`Task` per input layout:

============================  ==========================  =====================================  ==============
task                          item                        training loss                          read-out
============================  ==========================  =====================================  ==============
:class:`SliceTask`            one slice (+ neighbours)    weighted BCE                           TTA, 1 row
:class:`SegAuxTask`           one slice + subtype masks   weighted BCE + λ · (BCE + Dice) mask   ``classify``
:class:`SlabTask`             window of S slices          masked per-slice weighted BCE          TTA, S rows
:class:`SequenceTask`         a series of embeddings      masked per-slice weighted BCE          no TTA
============================  ==========================  =====================================  ==============

Every read-out is a list of (frame row, probabilities) pairs per item; :func:`predict_rows` sums them per row
(overlapping slab windows, TTA views) and :func:`finish_rows` averages, so each slice of the frame gets exactly
one prediction whatever the item is. Under DDP each process sums its own items and the sums are added.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset
from tqdm import tqdm

from rsna19.constants import CLASSES
from rsna19.data.augment import device_affine
from rsna19.data.datasets import SliceDataset, fit_cdf, read_cache_index
from rsna19.data.embeddings import SequenceDataset, collate_sequences, embeddings_complete, read_embeddings
from rsna19.data.folds import read_folds, split_by_fold
from rsna19.data.masks import SegSliceDataset
from rsna19.data.slab import SlabDataset
from rsna19.data.transforms import CDF, MultiWindow, decode_image
from rsna19.errors import UserError
from rsna19.inference.predict import TTA, autocast
from rsna19.nets import get_model_spec
from rsna19.training.config import TrainConfig
from rsna19.training.distributed import barrier
from rsna19.training.losses import masked_seq_loss, seg_aux_loss, weighted_bce

log = logging.getLogger(__name__)

Batch = dict[str, Any]


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors run: the device, the autocast mode and the memory format of 4D images."""

    device: torch.device
    amp: str = "none"
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Autocast context of ``amp`` on the device."""
        return autocast(self.device, self.amp)

    def to(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device (channels-last when it is a (B, C, H, W) image and that is asked for)."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4 and x.is_floating_point():
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def image(self, batch: Batch) -> torch.Tensor:
        """The batch's images on the device as float: uint8 images are decoded there (after the 4× smaller copy),
        and a shift-scale-rotate drawn by the loader for the device (``augment.affine_on_device``) is applied."""
        x = decode_image(batch["image"].to(self.device, non_blocking=True))
        if "affine" in batch:
            x = device_affine(x, batch["affine"], batch["fill"])
        return self.to(x)

    def mask(self, batch: Batch) -> torch.Tensor:
        """The batch's subtype masks on the device, warped like :meth:`image` (bilinear, thresholded at 0.5)."""
        m = self.to(batch["mask"])
        if "affine" in batch:
            m = (device_affine(m, batch["affine"]) > 0.5).to(m.dtype)
        return m


@dataclass
class FoldData:
    """What the trainer needs for one fold.

    Attributes:
        train: training items (their count is an epoch without ``data.samples_per_epoch``).
        val: validation items.
        val_frame: one row per validated slice, with the six labels; validation probabilities are in its order.
        mapping: the HU → channel mapping saved with the checkpoint (None: the task reads no images).
        model_kwargs: model arguments that come from the data (e.g. the embedding size).
    """

    train: Dataset
    val: Dataset
    val_frame: pd.DataFrame
    mapping: MultiWindow | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)


def _count(mask: torch.Tensor, target: torch.Tensor) -> int:
    """Labelled slices under ``mask`` (B, T) with targets (B, T, 6)."""
    return int((mask.bool() & torch.isfinite(target).all(dim=-1)).sum())


class Task:
    """The family-specific parts of training and prediction; subclasses fill them in.

    Args:
        cfg: the run's config.
    """

    #: ``collate_fn`` of the loaders (None: torch's default).
    collate: Callable[[list[Batch]], Batch] | None = None
    #: Whether test-time augmentation views apply.
    uses_tta: bool = True

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def fold_data(self, fold: int, device: torch.device, is_main: bool = True) -> FoldData:
        """Training and validation items of fold ``fold``."""
        raise NotImplementedError

    def prediction_data(
        self, state: dict[str, Any], fold_dir: Path, fold: int, split: str, cache: str | None, folds: str | None
    ) -> tuple[pd.DataFrame, Dataset]:
        """The slices to predict (one row each: the parquet's rows, with ``z`` and labels for ``oof``) and items.

        Args:
            state: the checkpoint.
            fold_dir: ``RUNS/<config>/fold_<k>``.
            fold: k.
            split: ``oof`` or ``test``.
            cache, folds: overrides of the run's recorded paths (then the environment, then the config).
        """
        raise NotImplementedError

    def loss(self, net: nn.Module, batch: Batch, rt: Runtime) -> tuple[torch.Tensor, int]:
        """Training loss of a batch and the number of labelled slices it averages over."""
        raise NotImplementedError

    def probs(self, model: nn.Module, batch: Batch, rt: Runtime, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Frame rows (B, K) (−1: none) and their sigmoid probabilities (B, K, 6), averaged over ``views``."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- image tasks


def _cache_path(cache: str | None, recorded: str | None) -> str:
    out = cache or os.environ.get("RSNA19_CACHE") or recorded
    if not out:
        raise UserError("no cache path: pass --cache or set RSNA19_CACHE")
    return out


def _folds_path(folds: str | None, recorded: str | None) -> str:
    out = folds or os.environ.get("RSNA19_FOLDS") or recorded
    if not out:
        raise UserError("no folds path: pass --folds or set RSNA19_FOLDS")
    return out


class ImageTask(Task):
    """Tasks that read slices from the conversion cache; subclasses choose the datasets and the heads."""

    def train_dataset(self, rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        """Augmented training items of ``rows``."""
        raise NotImplementedError

    def eval_dataset(self, cache: str, rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        """Deterministic items that cover every row of ``rows`` (validation and prediction)."""
        raise NotImplementedError

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Classification logits of a (TTA-transformed) input."""
        return model(x)

    def fold_data(self, fold: int, device: torch.device, is_main: bool = True) -> FoldData:
        cfg = self.cfg
        assert cfg.data.cache and cfg.data.folds
        index = read_cache_index(cfg.data.cache)
        train_rows, val_rows = split_by_fold(index, read_folds(cfg.data.folds), fold)
        if train_rows.empty or val_rows.empty:
            raise UserError(f"fold {fold}: {len(train_rows)} training and {len(val_rows)} validation slices")
        cdf = None
        if CDF in cfg.data.windows:
            cdf = fit_cdf(cfg.data.cache, train_rows["series_uid"].tolist(), cfg.data.cdf_series, cfg.train.seed)
        mapping = MultiWindow(cfg.data.windows, cdf=cdf)
        return FoldData(
            self.train_dataset(train_rows, mapping),
            self.eval_dataset(cfg.data.cache, val_rows, mapping),
            val_rows,
            mapping,
        )

    def prediction_data(
        self, state: dict[str, Any], fold_dir: Path, fold: int, split: str, cache: str | None, folds: str | None
    ) -> tuple[pd.DataFrame, Dataset]:
        cache = _cache_path(cache, self.cfg.data.cache)
        index = read_cache_index(cache)
        if split == "oof":
            _, rows = split_by_fold(index, read_folds(_folds_path(folds, self.cfg.data.folds)), fold)
        else:
            rows = index[index["split"] == "test"].reset_index(drop=True)
        if rows.empty:
            raise UserError(f"no {split} slices to predict for fold {fold} in {cache}")
        return rows, self.eval_dataset(cache, rows, MultiWindow.from_state(state["hu_mapping"]))

    def _tta(self, model: nn.Module, x: torch.Tensor, rt: Runtime, views: Sequence[str]) -> torch.Tensor:
        acc = None
        for v in views:
            with rt.autocast():
                p = torch.sigmoid(self.logits(model, TTA[v](x)).float())
            acc = p if acc is None else acc + p
        assert acc is not None
        return acc / len(views)


class SliceTask(ImageTask):
    """2D / 2.5D / combine-last models: one slice with its neighbours, one prediction (layouts channels, stack)."""

    def _slice_kwargs(self) -> dict[str, Any]:
        d = self.cfg.data
        return {
            "slices": d.slices,
            "layout": d.layout,
            "size": d.crop,
            "resize": d.resize,
            "image_dtype": d.image_dtype,
        }

    def train_dataset(self, rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        d = self.cfg.data
        assert d.cache
        return SliceDataset(
            d.cache, rows, mapping, augment=d.augment, train=True, seed=self.cfg.train.seed, **self._slice_kwargs()
        )

    def eval_dataset(self, cache: str, rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        return SliceDataset(cache, rows, mapping, train=False, **self._slice_kwargs())

    def loss(self, net: nn.Module, batch: Batch, rt: Runtime) -> tuple[torch.Tensor, int]:
        x, y = rt.image(batch), rt.to(batch["target"])
        with rt.autocast():
            logits = net(x)
        return weighted_bce(logits, y), len(x)

    def probs(self, model: nn.Module, batch: Batch, rt: Runtime, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        p = self._tta(model, rt.image(batch), rt, views)  # (B, 6)
        return batch["index"].numpy()[:, None], p[:, None].cpu().numpy()


class SegAuxTask(SliceTask):
    """Segmentation-aided models: training items carry subtype masks (where a file exists); read-out by ``classify``.

    Validation and prediction need no masks (and no decoder): they read plain slices.
    """

    def train_dataset(self, rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        d = self.cfg.data
        assert d.cache
        if d.masks is None:
            log.info("seg_aux: no data.masks (--masks / RSNA19_MASKS): the mask loss is off, classification only")
        elif not Path(d.masks).is_dir():
            raise UserError(f"masks folder not found: {d.masks} (data.masks, --masks or RSNA19_MASKS)")
        else:
            uids = rows["series_uid"].astype(str).unique()
            have = sum((Path(d.masks) / f"{u}.npz").is_file() for u in uids)
            log.info("seg_aux: %d of %d training series have masks in %s", have, len(uids), d.masks)
        return SegSliceDataset(
            d.cache,
            rows,
            mapping,
            augment=d.augment,
            train=True,
            seed=self.cfg.train.seed,
            masks_dir=d.masks,
            **self._slice_kwargs(),
        )

    def logits(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.classify(x)

    def loss(self, net: nn.Module, batch: Batch, rt: Runtime) -> tuple[torch.Tensor, int]:
        x, y = rt.image(batch), rt.to(batch["target"])
        with rt.autocast():
            cls, masks = net(x)
        lc = self.cfg.loss
        loss = seg_aux_loss(cls, masks, y, rt.mask(batch), rt.to(batch["has_mask"]), lc.mask_weight, lc.dice_weight)
        return loss, len(x)


class SlabTask(ImageTask):
    """3D slab models: windows of ``data.slices`` consecutive slices, a prediction for every slice.

    Training draws random windows and counts the middle ``data.label_slices``; validation and prediction tile
    each series with stride ``data.slab_stride`` and average the overlapping predictions per slice.
    """

    def _slab_kwargs(self) -> dict[str, Any]:
        d = self.cfg.data
        return {"slab": d.slices, "size": d.crop, "resize": d.resize, "image_dtype": d.image_dtype}

    def train_dataset(self, rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        d = self.cfg.data
        assert d.cache
        return SlabDataset(
            d.cache,
            rows,
            mapping,
            label_slices=d.label_slices,
            augment=d.augment,
            train=True,
            seed=self.cfg.train.seed,
            **self._slab_kwargs(),
        )

    def eval_dataset(self, cache: str, rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        return SlabDataset(cache, rows, mapping, stride=self.cfg.data.slab_stride, train=False, **self._slab_kwargs())

    def loss(self, net: nn.Module, batch: Batch, rt: Runtime) -> tuple[torch.Tensor, int]:
        x, y, keep = rt.image(batch), rt.to(batch["target"]), rt.to(batch["loss_mask"])
        with rt.autocast():
            logits = net(x)  # (B, S, 6)
        return masked_seq_loss(logits, y, keep), _count(keep, y)

    def probs(self, model: nn.Module, batch: Batch, rt: Runtime, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        p = self._tta(model, rt.image(batch), rt, views)  # (B, S, 6)
        return batch["rows"].numpy(), p.cpu().numpy()


# ------------------------------------------------------------------------------------------------ sequence


def ensure_embeddings(
    image_fold_dir: Path,
    fold: int,
    splits: Sequence[str],
    cache: str | None,
    folds: str | None,
    device: torch.device | str = "auto",
    progress: bool = False,
) -> None:
    """Write the embeddings of ``splits`` with the image run's fold-k model where they are missing (else a no-op).

    Raises:
        UserError: the image run has no checkpoint for this fold (it must be trained first).
    """
    missing = [s for s in splits if not embeddings_complete(image_fold_dir, s)]
    if not missing:
        return
    if not (image_fold_dir / "best.pt").is_file():
        raise UserError(
            f"no embeddings {', '.join(missing)} in {image_fold_dir} and no best.pt to compute them with: train the "
            f"image run first (rsna19 train <its config> --fold {fold}), then `rsna19 embed {image_fold_dir.parent} "
            f"--fold {fold}`"
        )
    from rsna19.inference.embed import extract_embeddings  # embed imports the nets; keep this module light

    log.info("computing the %s embeddings of %s", ", ".join(missing), image_fold_dir)
    extract_embeddings(image_fold_dir, fold, missing, cache=cache, folds=folds, device=str(device), progress=progress)


def _base_logits(batch: Batch, rt: Runtime) -> torch.Tensor | None:
    """The image model's logits (B, T, 6) of a sequence batch on the device, or None (no ``logit_skip``)."""
    return rt.to(batch["base"]) if "base" in batch else None


class SequenceTask(Task):
    """Second-stage sequence models over the per-slice embeddings of an image run (``data.embeddings``).

    Fold k validates on ``embeddings_oof`` of the image run's fold k (fold k's image model never saw those
    patients). What it trains on is ``data.embedding_source``:

    * ``"oof"`` (default, the usual stacking recipe): the series of each fold j ≠ k's patients, embedded by fold
      j's image model (its OOF embeddings). Every training embedding is then held out for the model that made
      it, like the validation ones. This needs every fold of the image run. The leak is the small, standard one
      of stacking: fold j's image model trained on fold k's patients, so the training inputs of fold k carry a
      little knowledge of its validation patients' labels. Embeddings of image models trained apart need not
      align across folds; their logits do, so use ``model.args.logit_skip`` with it (on the demo, with the skip:
      0.232 OOF wll vs 0.2195 with ``"fold"``; without it 0.397 vs 0.308; docs/benchmarks.md, "Families").
    * ``"fold"``: ``embeddings_train`` of fold k's image model, i.e. the embeddings of the very patients it
      trained on. No leak at all, but they are cleaner than the held-out ones, so the sequence model may overfit.

    Missing embeddings are computed first (the image runs' ``best.pt``). An item is a whole series in slice order.
    """

    uses_tta = False

    @staticmethod
    def collate(items: list[Batch]) -> Batch:  # type: ignore[override]
        return collate_sequences(items)

    @property
    def _logit_skip(self) -> bool:
        """The model reads the image model's logits too (``model.args.logit_skip``; see :class:`SeqModel`)."""
        return bool(self.cfg.model.args.get("logit_skip", False))

    def _image_fold_dir(self, runs: str | os.PathLike[str], fold: int) -> Path:
        if not self.cfg.data.embeddings:
            raise UserError("a sequence model needs data.embeddings: the image run whose embeddings it reads")
        return Path(runs) / self.cfg.data.embeddings / f"fold_{fold}"

    def fold_data(self, fold: int, device: torch.device, is_main: bool = True) -> FoldData:
        cfg = self.cfg
        assert cfg.runs and cfg.data.folds
        folds = read_folds(cfg.data.folds)
        if cfg.data.embedding_source == "fold":
            sources = {fold: ("train", "oof")}
        else:
            sources = {j: ("oof",) for j in range(int(folds["fold"].max()) + 1)}
            self._require_image_folds(sources)
        if is_main:
            for j, splits in sources.items():
                src = self._image_fold_dir(cfg.runs, j)
                ensure_embeddings(src, j, splits, cfg.data.cache, cfg.data.folds, device, cfg.train.progress)
        barrier()
        src = self._image_fold_dir(cfg.runs, fold)
        val_frame, val_x, val_info = read_embeddings(src, "oof")
        self._check_held_out(src, folds, fold, val_frame, held=True)
        if cfg.data.embedding_source == "fold":
            train_sources = [(fold, "train", False)]  # (image fold, split, whether its patients are that fold's)
        else:
            train_sources = [(j, "oof", True) for j in sources if j != fold]
        parts: list[SequenceDataset] = []
        for j, split, held in train_sources:
            other = self._image_fold_dir(cfg.runs, j)
            frame, x, info = read_embeddings(other, split)
            self._check_held_out(other, folds, j if held else fold, frame, held=held)
            if info["dim"] != val_info["dim"]:
                raise UserError(f"{other}: {split} embeddings have {info['dim']} features, {src} oof {val_info['dim']}")
            parts.append(SequenceDataset(frame, x, with_logits=self._logit_skip))
        # One dataset per source keeps each memory map as it is; the loss reads x/target/mask, not frame rows.
        train: Dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        if len(train) == 0 or val_frame.empty:
            raise UserError(f"fold {fold}: {len(train)} training series and {len(val_frame)} validation embeddings")
        return FoldData(
            train,
            SequenceDataset(val_frame, val_x, with_logits=self._logit_skip),
            val_frame,
            None,
            {"in_features": int(val_info["dim"])},
        )

    def _require_image_folds(self, sources: dict[int, Sequence[str]]) -> None:
        """Every fold of the image run must have its OOF embeddings or a checkpoint to compute them with."""
        assert self.cfg.runs
        missing = []
        for j, splits in sources.items():
            src = self._image_fold_dir(self.cfg.runs, j)
            have = all(embeddings_complete(src, s) for s in splits)
            if not have and not (src / "best.pt").is_file():
                missing.append(str(src))
        if missing:
            raise UserError(
                f"data.embedding_source: oof reads the OOF embeddings of every fold of the image run, and "
                f"{len(missing)} fold run(s) have neither embeddings nor best.pt: {', '.join(missing)}; train the "
                f"image run first (rsna19 train <its config> --fold j), or set data.embedding_source=fold"
            )

    def _check_held_out(self, src: Path, folds: pd.DataFrame, fold: int, frame: pd.DataFrame, held: bool) -> None:
        """``frame``'s patients must be all in fold ``fold`` (``held``) or all outside it: else the folds differ."""
        in_fold = set(folds.loc[folds["fold"] == fold, "patient_id"].astype(str))
        patients = set(frame["patient_id"].astype(str))
        wrong = patients - in_fold if held else patients & in_fold
        if wrong:
            where = "outside" if held else "inside"
            raise UserError(
                f"{src}: the embeddings were split with other folds than {self.cfg.data.folds} "
                f"({len(wrong)} patients {where} fold {fold}); re-embed with the same folds file"
            )

    def prediction_data(
        self, state: dict[str, Any], fold_dir: Path, fold: int, split: str, cache: str | None, folds: str | None
    ) -> tuple[pd.DataFrame, Dataset]:
        # The image run is a sibling of this run under RUNS (wherever RUNS now is), else the recorded RUNS.
        src = self._image_fold_dir(fold_dir.parent.parent, fold)
        if not src.is_dir():
            runs = os.environ.get("RSNA19_RUNS") or self.cfg.runs
            if runs:
                src = self._image_fold_dir(runs, fold)
        cache_path = cache or os.environ.get("RSNA19_CACHE") or self.cfg.data.cache
        folds_path = folds or os.environ.get("RSNA19_FOLDS") or self.cfg.data.folds
        ensure_embeddings(src, fold, (split,), cache_path, folds_path, "auto")
        frame, x, info = read_embeddings(src, split)
        want = state["model_kwargs"].get("in_features")
        if want is not None and int(info["dim"]) != int(want):
            raise UserError(f"{src}: {split} embeddings have {info['dim']} features, the model reads {want}")
        if frame.empty:
            raise UserError(f"no {split} embeddings to predict for fold {fold} in {src}")
        skip = bool(state["model_kwargs"].get("logit_skip", False))
        return frame.rename(columns={"slice_idx": "z"}), SequenceDataset(frame, x, with_logits=skip)

    def loss(self, net: nn.Module, batch: Batch, rt: Runtime) -> tuple[torch.Tensor, int]:
        x, y, mask = rt.to(batch["x"]), rt.to(batch["target"]), rt.mask(batch)
        with rt.autocast():
            logits = net(x, batch["lengths"], _base_logits(batch, rt))  # (B, T, 6); lengths stay on the CPU
        return masked_seq_loss(logits, y, mask), _count(mask, y)

    def probs(self, model: nn.Module, batch: Batch, rt: Runtime, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        with rt.autocast():
            logits = model(rt.to(batch["x"]), batch["lengths"], _base_logits(batch, rt))
        return batch["rows"].numpy(), torch.sigmoid(logits.float()).cpu().numpy()


# ------------------------------------------------------------------------------------------------ registry

#: Task of each input layout; :data:`FAMILY_TASKS` overrides it for families with their own heads or losses.
LAYOUT_TASKS: dict[str, type[Task]] = {
    "channels": SliceTask,
    "stack": SliceTask,
    "slab": SlabTask,
    "sequence": SequenceTask,
}
FAMILY_TASKS: dict[str, type[Task]] = {"seg_aux": SegAuxTask}


def get_task(cfg: TrainConfig) -> Task:
    """The task of ``cfg.model.name``.

    Raises:
        UserError: the config's ``data.layout`` is not the model's input layout.
    """
    spec = get_model_spec(cfg.model.name)
    if spec.input_layout != cfg.data.layout:
        raise UserError(f"model {spec.name!r} takes data.layout: {spec.input_layout}, the config has {cfg.data.layout}")
    cls = FAMILY_TASKS.get(spec.family) or LAYOUT_TASKS.get(spec.input_layout)
    if cls is None:
        raise UserError(f"model {spec.name!r}: no task for input layout {spec.input_layout!r}")
    return cls(cfg)


# ------------------------------------------------------------------------------------------------ read-out


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
    progress: bool = False,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row sums of the probabilities of ``items`` of ``dataset`` (all by default), and how many there were.

    Returns:
        ``(total (n_rows, 6) float64, count (n_rows,) float64)``: add these over processes, then
        :func:`finish_rows`.
    """
    model.eval()
    views = list(views) if task.uses_tta else ["none"]
    subset = Subset(dataset, list(range(len(dataset))) if items is None else list(items))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=task.collate)
    total = np.zeros((n_rows, len(CLASSES)), dtype=np.float64)
    count = np.zeros(n_rows, dtype=np.float64)
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
        rows, probs = task.probs(model, batch, rt, views)
        keep = rows >= 0
        np.add.at(total, rows[keep], probs[keep].astype(np.float64))
        np.add.at(count, rows[keep], 1.0)
    return total, count


def finish_rows(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Mean probability per row, (n_rows, 6) float32.

    Raises:
        ValueError: a row that no item predicted (the items would not cover the frame).
    """
    missing = np.flatnonzero(count <= 0)
    if len(missing):
        raise ValueError(f"{len(missing)} of {len(count)} slices got no prediction, e.g. row {missing[0]}")
    return (total / count[:, None]).astype(np.float32)
