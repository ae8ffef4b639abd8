"""Per-family tasks: how a model family is fed, what it is trained on, and how it is read out.

The trainer (:mod:`rsna19.training.trainer`), the predictor (:mod:`rsna19.engine.predictor`: ``rsna19 predict``,
``rsna19 embed``, bundles, ``predict-study``) and the read-out loops (:mod:`rsna19.engine.forward`) are the same
for every family; what differs lives here, in one :class:`Task` per kind of item:

============================  ==========================  =====================================  ==============
task                          item                        training loss                          read-out
============================  ==========================  =====================================  ==============
:class:`SliceTask`            one slice (+ neighbours)    weighted BCE                           TTA, 1 row
:class:`SegAuxTask`           one slice + subtype masks   weighted BCE + λ · (BCE + Dice) mask   ``classify``
:class:`SlabTask`             window of S slices          masked per-slice weighted BCE          TTA, S rows
:class:`SequenceTask`         a series of embeddings      masked per-slice weighted BCE          no TTA
============================  ==========================  =====================================  ==============

A model family names its task when it registers (``register_model(..., task="slice")``; by default the task of its
input layout), and a task registers itself here with :func:`register_task`: a new family with a known kind of item is
one module in :mod:`rsna19.nets`; one with a new kind of item adds its task class below, nothing else.

A task never computes another run's outputs itself: :meth:`Task.required_embeddings` declares what it reads (the
sequence model: an image run's embeddings), and the caller (trainer, ``rsna19 predict``, the pipeline's embed stage)
provides it through :mod:`rsna19.engine.embed`.
"""

from __future__ import annotations

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
from torch.utils.data import ConcatDataset, Dataset

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.data.datasets import SliceDataset, fit_cdf, read_cache_index
from rsna19.data.embeddings import (
    LOGIT_COLUMNS,
    SequenceDataset,
    collate_sequences,
    embeddings_complete,
    read_embeddings,
)
from rsna19.data.folds import read_folds, split_by_fold
from rsna19.data.masks import SegSliceDataset
from rsna19.data.reference import reference_target
from rsna19.data.slab import SlabDataset
from rsna19.data.transforms import CDF, MultiWindow
from rsna19.engine.config import TrainConfig
from rsna19.engine.losses import masked_seq_loss, seg_aux_loss, weighted_bce
from rsna19.engine.runtime import TTA, Batch, Runtime
from rsna19.nets import get_model_spec

log = logging.getLogger(__name__)


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
    #: Whether :meth:`embed` gives per-slice features (the input of a sequence model).
    can_embed: bool = False
    #: Whether :meth:`cache_dataset` reads slices from a conversion cache (else: see :meth:`required_embeddings`).
    reads_cache: bool = True

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    def required_embeddings(self, runs: str | os.PathLike[str], fold: int, splits: Sequence[str]) -> list[Embedding]:
        """Embeddings of other runs this task reads for fold ``fold`` (``splits``: what is predicted; for training
        pass ``()``); the caller makes sure they exist before :meth:`fold_data` / :meth:`prediction_data`."""
        return []

    def cache_dataset(self, cache: str | os.PathLike[str], rows: pd.DataFrame, hu_mapping: dict[str, Any]) -> Dataset:
        """Deterministic items covering ``rows`` of a conversion cache, for prediction with a run's HU mapping."""
        raise UserError(f"{type(self).__name__} does not read a conversion cache")

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

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The freshly built model before training (e.g. freeze what this task's loss never reaches)."""
        return model

    def loss(self, net: nn.Module, batch: Batch, rt: Runtime) -> tuple[torch.Tensor, int]:
        """Training loss of a batch and the number of labelled slices it averages over."""
        raise NotImplementedError

    def probs(self, model: nn.Module, batch: Batch, rt: Runtime, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Frame rows (B, K) (−1: none) and their sigmoid probabilities (B, K, 6), averaged over ``views``."""
        raise NotImplementedError

    def embed(
        self, model: nn.Module, batch: Batch, rt: Runtime, views: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Frame rows (B,), pooled features (B, D) and head logits (B, 6), each averaged over ``views``."""
        raise UserError(f"{type(self).__name__}: model {self.cfg.model.name!r} gives no per-slice embeddings")


@dataclass(frozen=True)
class Embedding:
    """Embeddings a task reads: ``splits`` of fold ``fold`` of the image run in ``fold_dir``."""

    fold_dir: Path
    fold: int
    splits: tuple[str, ...]


#: Task classes by name (:func:`register_task`); a model family names its task in ``register_model``.
TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator adding a task under ``name`` (the ``task=`` of :func:`rsna19.nets.register_model`)."""

    def wrap(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        TASKS[name] = cls
        return cls

    return wrap


# ----------------------------------------------------------------------------------------------- image tasks


def cache_path(cache: str | None, recorded: str | None) -> str:
    """The conversion cache: the given path, else ``$RSNA19_CACHE``, else the run's recorded one."""
    out = cache or os.environ.get("RSNA19_CACHE") or recorded
    if not out:
        raise UserError("no cache path: pass --cache or set RSNA19_CACHE")
    return out


def folds_path(folds: str | None, recorded: str | None) -> str:
    """The folds csv: the given path, else ``$RSNA19_FOLDS``, else the run's recorded one."""
    out = folds or os.environ.get("RSNA19_FOLDS") or recorded
    if not out:
        raise UserError("no folds path: pass --folds or set RSNA19_FOLDS")
    return out


class ImageTask(Task):
    """Tasks that read slices from the conversion cache; subclasses choose the datasets and the heads."""

    def train_dataset(self, rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        """Augmented training items of ``rows``."""
        raise NotImplementedError

    def eval_dataset(self, cache: str | os.PathLike[str], rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        """Deterministic items that cover every row of ``rows`` (validation and prediction)."""
        raise NotImplementedError

    def cache_dataset(self, cache: str | os.PathLike[str], rows: pd.DataFrame, hu_mapping: dict[str, Any]) -> Dataset:
        return self.eval_dataset(cache, rows, MultiWindow.from_state(hu_mapping))

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
        mapping = MultiWindow(
            cfg.data.windows,
            cdf=cdf,
            reference_hu=reference_target(cfg.data.hu_reference),
            smooth_px=cfg.data.smooth_px,
        )
        return FoldData(
            self.train_dataset(train_rows, mapping),
            self.eval_dataset(cfg.data.cache, val_rows, mapping),
            val_rows,
            mapping,
        )

    def prediction_data(
        self, state: dict[str, Any], fold_dir: Path, fold: int, split: str, cache: str | None, folds: str | None
    ) -> tuple[pd.DataFrame, Dataset]:
        cache = cache_path(cache, self.cfg.data.cache)
        index = read_cache_index(cache)
        if split == "oof":
            _, rows = split_by_fold(index, read_folds(folds_path(folds, self.cfg.data.folds)), fold)
        else:
            rows = index[index["split"] == "test"].reset_index(drop=True)
        if rows.empty:
            raise UserError(f"no {split} slices to predict for fold {fold} in {cache}")
        return rows, self.cache_dataset(cache, rows, state["hu_mapping"])

    def _tta(self, model: nn.Module, x: torch.Tensor, rt: Runtime, views: Sequence[str]) -> torch.Tensor:
        acc = None
        for v in views:
            with rt.autocast():
                p = torch.sigmoid(self.logits(model, TTA[v](x)).float())
            acc = p if acc is None else acc + p
        assert acc is not None
        return acc / len(views)


@register_task("slice")
class SliceTask(ImageTask):
    """2D / 2.5D / combine-last models: one slice with its neighbours, one prediction (layouts channels, stack)."""

    can_embed = True

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

    def eval_dataset(self, cache: str | os.PathLike[str], rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        return SliceDataset(cache, rows, mapping, train=False, **self._slice_kwargs())

    def loss(self, net: nn.Module, batch: Batch, rt: Runtime) -> tuple[torch.Tensor, int]:
        x, y = rt.image(batch), rt.to(batch["target"])
        with rt.autocast():
            logits = net(x)
        return weighted_bce(logits, y), len(x)

    def probs(self, model: nn.Module, batch: Batch, rt: Runtime, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        p = self._tta(model, rt.image(batch), rt, views)  # (B, 6)
        return batch["index"].numpy()[:, None], p[:, None].cpu().numpy()

    def embed(
        self, model: nn.Module, batch: Batch, rt: Runtime, views: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not callable(getattr(model, "features", None)) or not callable(getattr(model, "head", None)):
            raise UserError(f"{type(model).__name__} has no features() and head(): it cannot give embeddings")
        x = rt.image(batch)
        acc_f = acc_z = None
        for v in views:
            with rt.autocast():
                f = model.features(TTA[v](x))
                z = model.head(f)
            if f.ndim != 2:
                raise UserError(f"{type(model).__name__}.features gives {tuple(f.shape)}, not one vector per slice")
            acc_f = f.float() if acc_f is None else acc_f + f.float()
            acc_z = z.float() if acc_z is None else acc_z + z.float()
        assert acc_f is not None and acc_z is not None
        n = len(views)
        return batch["index"].numpy(), (acc_f / n).cpu().numpy(), (acc_z / n).cpu().numpy()


@register_task("seg_aux")
class SegAuxTask(SliceTask):
    """Segmentation-aided models: training items carry subtype masks (where a file exists); read-out by ``classify``.

    Validation and prediction need no masks (and no decoder): they read plain slices. Without ``data.masks`` (the
    real RSNA data has none) the model trains as a classifier: plain slice items (no zero masks through the loader),
    no decoder forward, and the decoder's parameters frozen (:meth:`prepare_model`).
    """

    @property
    def with_masks(self) -> bool:
        """True when ``data.masks`` names a folder: the mask loss is on."""
        return self.cfg.data.masks is not None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        if not self.with_masks:
            for p in model.decoder_parameters():
                p.requires_grad_(False)
        return model

    def train_dataset(self, rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
        d = self.cfg.data
        assert d.cache
        if d.masks is None:
            log.info("seg_aux: no data.masks (--masks / RSNA19_MASKS): classification only, the decoder is not run")
            return super().train_dataset(rows, mapping)
        if not Path(d.masks).is_dir():
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
        if not self.with_masks:
            with rt.autocast():
                logits = net(x, decode=False)
            return weighted_bce(logits, y), len(x)
        with rt.autocast():
            cls, masks = net(x)
        lc = self.cfg.loss
        loss = seg_aux_loss(cls, masks, y, rt.mask(batch), rt.to(batch["has_mask"]), lc.mask_weight, lc.dice_weight)
        return loss, len(x)


@register_task("slab")
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

    def eval_dataset(self, cache: str | os.PathLike[str], rows: pd.DataFrame, mapping: MultiWindow) -> Dataset:
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


def _base_logits(batch: Batch, rt: Runtime) -> torch.Tensor | None:
    """The image model's logits (B, T, 6) of a sequence batch on the device, or None (no ``logit_skip``)."""
    return rt.to(batch["base"]) if "base" in batch else None


@register_task("sequence")
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
      0.232 OOF wll vs 0.2195 with ``"fold"``; without it 0.397 vs 0.308: docs/benchmarks.md, "Families").
    * ``"fold"``: ``embeddings_train`` of fold k's image model, i.e. the embeddings of the very patients it
      trained on. No leak at all, but they are cleaner than the held-out ones, so the sequence model may overfit.
      With ``data.train_logits: "oof"`` (and the logit skip) their logits are each patient's held-out ones from
      the other folds' ``embeddings_oof`` (:meth:`_with_held_out_logits`).

    :meth:`required_embeddings` lists what must exist first; an item is a whole series in slice order. In
    ``predict-study`` the embeddings are computed in memory by the bundled image model (:mod:`rsna19.engine.predictor`).
    """

    uses_tta = False
    reads_cache = False

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

    @property
    def _held_out_train_logits(self) -> bool:
        """Training series read fold k's in-sample embeddings but the other folds' held-out logits."""
        d = self.cfg.data
        return self._logit_skip and d.embedding_source == "fold" and d.train_logits == "oof"

    def train_sources(self, fold: int, n_folds: int) -> dict[int, tuple[str, ...]]:
        """Image fold → the embedding splits fold ``fold``'s training and validation read from it."""
        if self.cfg.data.embedding_source == "fold":
            sources: dict[int, tuple[str, ...]] = {fold: ("train", "oof")}
            if self._held_out_train_logits:
                sources.update({j: ("oof",) for j in range(n_folds) if j != fold})
            return sources
        return {j: ("oof",) for j in range(n_folds)}

    def required_embeddings(self, runs: str | os.PathLike[str], fold: int, splits: Sequence[str]) -> list[Embedding]:
        if splits:  # prediction: fold k's image model embeds what is predicted
            return [Embedding(self._image_fold_dir(runs, fold), fold, tuple(splits))]
        assert self.cfg.data.folds
        n_folds = int(read_folds(self.cfg.data.folds)["fold"].max()) + 1
        sources = self.train_sources(fold, n_folds)
        return [Embedding(self._image_fold_dir(runs, j), j, sp) for j, sp in sources.items()]

    def fold_data(self, fold: int, device: torch.device, is_main: bool = True) -> FoldData:
        cfg = self.cfg
        assert cfg.runs and cfg.data.folds
        folds = read_folds(cfg.data.folds)
        sources = self.train_sources(fold, int(folds["fold"].max()) + 1)
        missing = [
            f"{self._image_fold_dir(cfg.runs, j)} ({s})"
            for j, splits in sources.items()
            for s in splits
            if not embeddings_complete(self._image_fold_dir(cfg.runs, j), s)
        ]
        if missing:
            raise UserError(
                f"missing embeddings: {', '.join(missing)}; train the image run {cfg.data.embeddings!r} on those "
                f"folds, then `rsna19 embed RUNS/{cfg.data.embeddings} --fold j` (`rsna19 train` does it for you)"
            )
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
            if self._held_out_train_logits:
                frame = self._with_held_out_logits(frame, fold, [j for j in sources if j != fold])
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

    def _with_held_out_logits(self, frame: pd.DataFrame, fold: int, others: list[int]) -> pd.DataFrame:
        """``frame`` (fold ``fold``'s in-sample training rows) with its logit columns replaced by each row's logits
        in the OOF embeddings of the image folds ``others``, which never trained on those patients.

        In-sample logits are more confident than any a new series gets; a sequence model that learns its
        correction on them learns to push a moderate logit down, which costs the moderate positives of a harder
        test set or another scanner (docs/benchmarks.md, "Scanner shift").

        Raises:
            UserError: a training slice has no held-out logits (the image run's folds differ from the folds file).
        """
        assert self.cfg.runs
        held = pd.concat(
            [read_embeddings(self._image_fold_dir(self.cfg.runs, j), "oof")[0] for j in others], ignore_index=True
        ).set_index("sop_uid")[list(LOGIT_COLUMNS)]
        missing = ~frame["sop_uid"].isin(held.index)
        if missing.any():
            raise UserError(
                f"fold {fold}: {int(missing.sum())} training slices have no held-out logits in the OOF embeddings of "
                f"image folds {others}; re-embed with the same folds file"
            )
        out = frame.copy()
        out[list(LOGIT_COLUMNS)] = held.loc[out["sop_uid"].to_numpy()].to_numpy()
        return out

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

    def image_fold_dir(self, fold_dir: Path, fold: int) -> Path:
        """The image run's fold folder for this run's ``fold_dir``: a sibling under the same RUNS folder (wherever
        RUNS now is), else under ``RSNA19_RUNS`` or the recorded ``runs``."""
        src = self._image_fold_dir(fold_dir.parent.parent, fold)
        if not src.is_dir():
            runs = os.environ.get("RSNA19_RUNS") or self.cfg.runs
            if runs:
                src = self._image_fold_dir(runs, fold)
        return src

    def prediction_data(
        self, state: dict[str, Any], fold_dir: Path, fold: int, split: str, cache: str | None, folds: str | None
    ) -> tuple[pd.DataFrame, Dataset]:
        src = self.image_fold_dir(fold_dir, fold)
        frame, x, info = read_embeddings(src, split)
        want = state["model_kwargs"].get("in_features")
        if want is not None and int(info["dim"]) != int(want):
            raise UserError(f"{src}: {split} embeddings have {info['dim']} features, the model reads {want}")
        if frame.empty:
            raise UserError(f"no {split} embeddings to predict for fold {fold} in {src}")
        skip = bool(state["model_kwargs"].get("logit_skip", False))
        return frame.rename(columns={"slice_idx": "z"}), SequenceDataset(frame, x, with_logits=skip)

    @staticmethod
    def memory_dataset(
        rows: pd.DataFrame, features: np.ndarray, logits: np.ndarray, model_kwargs: dict[str, Any]
    ) -> SequenceDataset:
        """Items of embeddings computed in memory (``predict-study``): ``rows`` are cache-index rows (``z``)."""
        frame = pd.DataFrame({"series_uid": rows["series_uid"].astype(str).to_numpy(), "slice_idx": rows["z"]})
        for i, c in enumerate(CLASSES):
            frame[f"logit_{c}"] = logits[:, i].astype(np.float32)
        return SequenceDataset(frame, features, with_logits=bool(model_kwargs.get("logit_skip", False)))

    def loss(self, net: nn.Module, batch: Batch, rt: Runtime) -> tuple[torch.Tensor, int]:
        x, y, mask = rt.to(batch["x"]), rt.to(batch["target"]), rt.mask(batch)
        with rt.autocast():
            logits = net(x, batch["lengths"], _base_logits(batch, rt))  # (B, T, 6); lengths stay on the CPU
        return masked_seq_loss(logits, y, mask), _count(mask, y)

    def probs(self, model: nn.Module, batch: Batch, rt: Runtime, views: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        with rt.autocast():
            logits = model(rt.to(batch["x"]), batch["lengths"], _base_logits(batch, rt))
        return batch["rows"].numpy(), torch.sigmoid(logits.float()).cpu().numpy()


# ------------------------------------------------------------------------------------------------ lookup


def get_task(cfg: TrainConfig) -> Task:
    """The task of ``cfg.model.name`` (the ``task`` its family registered with).

    Raises:
        UserError: the config's ``data.layout`` is not the model's input layout, or no task has that name.
    """
    spec = get_model_spec(cfg.model.name)
    if spec.input_layout != cfg.data.layout:
        raise UserError(f"model {spec.name!r} takes data.layout: {spec.input_layout}, the config has {cfg.data.layout}")
    cls = TASKS.get(spec.task)
    if cls is None:
        raise UserError(f"model {spec.name!r}: no task {spec.task!r}; registered: {', '.join(sorted(TASKS))}")
    return cls(cfg)
