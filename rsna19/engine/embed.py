"""Per-slice embeddings of a trained 2D / 2.5D run for the sequence model (``rsna19 embed``).

``extract_embeddings(run_dir, fold)`` loads fold k's checkpoint into a :class:`~rsna19.engine.predictor.Predictor`,
reads every slice of the requested splits with the run's own input mapping, and stores the model's pooled
features (``model.features(x)``: what its head sees) and its six logits (``model.head`` of those features), both
averaged over the TTA views (:meth:`~rsna19.engine.tasks.Task.embed`), as described in
:mod:`rsna19.data.embeddings`. All splits of fold k come from fold
k's model: the ``oof`` embeddings of the fold's held-out patients are never computed by a model that trained on
them.

Finished splits are skipped on re-run (the ``.json`` is written last); ``overwrite=True`` recomputes them.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsna19.core.atomic import atomic_path, write_parquet, write_text
from rsna19.core.constants import CLASSES, DEFAULT_TTA
from rsna19.core.errors import UserError
from rsna19.data.datasets import read_cache_index, slice_ids
from rsna19.data.embeddings import EMBED_COLUMNS, EMBED_SPLITS, embedding_paths, embeddings_complete
from rsna19.data.folds import read_folds, split_by_fold
from rsna19.engine.predictor import Predictor, run_fold_dir
from rsna19.engine.tasks import Embedding, cache_path, folds_path

log = logging.getLogger(__name__)


def embedding_frame(rows: pd.DataFrame, fold: int, split: str, logits: np.ndarray | None = None) -> pd.DataFrame:
    """The ``embeddings_<split>.parquet`` table for ``rows`` of the cache index (labels kept where present).

    ``logits`` (len(rows), 6): the image model's TTA-averaged logits, stored as ``logit_<class>`` columns.
    """
    df = slice_ids(rows, fold)
    df["split"] = np.full(len(rows), split, dtype=object)
    assert list(df.columns) == list(EMBED_COLUMNS)
    if split != "test":
        for c in CLASSES:
            df[c] = rows[c].to_numpy(dtype=np.float64)
    if logits is not None:
        for i, c in enumerate(CLASSES):
            df[f"logit_{c}"] = logits[:, i].astype(np.float32)
    return df


@dataclass(frozen=True)
class CheckpointOptions:
    """How ``rsna19 predict`` and ``rsna19 embed`` load and run one fold's checkpoint.

    Attributes:
        checkpoint: ``best`` or ``last``.
        tta: views averaged (``none``, ``hflip``, ``vflip``, ``transpose``).
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: defaults to the run's validation batch size.
        num_workers: loader processes (default: the run's data.num_workers).
    """

    checkpoint: str = "best"
    tta: Sequence[str] = DEFAULT_TTA
    device: str = "auto"
    batch_size: int | None = None
    num_workers: int | None = None

    def check(self) -> None:
        """Raise UserError for an unknown checkpoint name."""
        if self.checkpoint not in ("best", "last"):
            raise UserError(f"--checkpoint must be best or last, got {self.checkpoint!r}")

    def load(self, fold_dir: Path) -> tuple[Predictor, dict[str, Any]]:
        """The one-fold predictor of ``fold_dir``'s checkpoint, and the checkpoint."""
        return Predictor.from_checkpoint(
            fold_dir / f"{self.checkpoint}.pt",
            device=self.device,
            tta=self.tta,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
        )


def extract_embeddings(
    run_dir: str | os.PathLike[str],
    fold: int,
    splits: Sequence[str] = EMBED_SPLITS,
    options: CheckpointOptions | None = None,
    cache: str | None = None,
    folds: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the embeddings of ``splits`` with fold ``fold``'s model of a 2D / 2.5D run.

    Args:
        run_dir: ``RUNS/<config name>`` or its ``fold_<k>``.
        fold: the fold k (its model embeds every split).
        splits: any of ``train`` (fold k's training patients), ``oof`` (its held-out patients), ``test``.
        options: checkpoint, TTA views, device, batch size and loader processes (defaults when None).
        cache, folds: override the paths recorded in the run's config.
        dtype: ``float32`` or ``float16`` storage.
        overwrite: recompute splits that are already complete.
        progress: progress bars.

    Returns:
        ``{split: path of embeddings_<split>.npy}``.

    Raises:
        UserError: unknown split/checkpoint/dtype, a run of a family without per-slice features, missing paths,
            or a split with no slices.
    """
    options = options or CheckpointOptions()
    options.check()
    if dtype not in ("float32", "float16"):
        raise UserError(f"--dtype must be float32 or float16, got {dtype!r}")
    for s in splits:
        embedding_paths(".", s)  # validates the name
    fold_dir = run_fold_dir(run_dir, fold)
    todo = [s for s in dict.fromkeys(splits) if overwrite or not embeddings_complete(fold_dir, s)]
    out = {s: embedding_paths(fold_dir, s)["npy"] for s in dict.fromkeys(splits)}
    if not todo:
        log.info("embeddings of %s (%s) are complete; nothing to do", fold_dir, ", ".join(out))
        return out

    predictor, state = options.load(fold_dir)
    cfg = predictor.cfg
    if not predictor.task.can_embed:
        raise UserError(
            f"model {predictor.model_name!r} ({cfg.data.layout} input) gives no per-slice embeddings; use a 2D/2.5D run"
        )
    cache = cache_path(cache, cfg.data.cache)
    index = read_cache_index(cache)
    if any(s != "test" for s in todo):
        train_rows, val_rows = split_by_fold(index, read_folds(folds_path(folds, cfg.data.folds)), fold)
    rows_of = {
        "train": lambda: train_rows,
        "oof": lambda: val_rows,
        "test": lambda: index[index["split"] == "test"].reset_index(drop=True),
    }
    info = {"run": str(fold_dir), "model": cfg.name, "model_name": predictor.model_name}
    info.update(checkpoint=options.checkpoint, epoch=int(state["epoch"]), fold=fold)
    for split in todo:
        rows = rows_of[split]().reset_index(drop=True)
        if rows.empty:
            raise UserError(f"no {split} slices to embed for fold {fold} in {cache}")
        _embed_split(
            predictor, cache, rows, embedding_paths(fold_dir, split), {**info, "split": split}, dtype, progress
        )
    return out


def _embed_split(
    predictor: Predictor,
    cache: str,
    rows: pd.DataFrame,
    paths: dict[str, Path],
    info: dict[str, Any],
    dtype: str,
    progress: bool,
) -> None:
    """Embed the cache ``rows`` of one split and write them to ``paths``, the ``.json`` (``info`` and the shape)
    last."""
    split = info["split"]
    ds = predictor.cache_items(predictor.members[0], cache, rows)
    feats, logits = predictor.embed_items(predictor.members[0], ds, len(rows), progress=progress, desc=f"embed {split}")
    paths["json"].unlink(missing_ok=True)  # incomplete until the json is back
    with atomic_path(paths["npy"]) as tmp, open(tmp, "wb") as fh:
        np.save(fh, feats.astype(dtype))
    write_parquet(embedding_frame(rows, info["fold"], split, logits), paths["parquet"])
    info = {**info, "tta": predictor.views, "n": int(feats.shape[0]), "dim": int(feats.shape[1]), "dtype": dtype}
    info["logits"] = True  # logit_<class> columns in the parquet (older embeddings lack them)
    write_text(json.dumps(info, indent=1) + "\n", paths["json"])
    views = ",".join(predictor.views)
    log.info("wrote %s: %d slices × %d features (TTA %s)", paths["npy"], feats.shape[0], feats.shape[1], views)


def ensure_embeddings(
    needs: Sequence[Embedding],
    cache: str | None,
    folds: str | None,
    device: str = "auto",
    tta: Sequence[str] = DEFAULT_TTA,
    progress: bool = False,
) -> None:
    """Write the embeddings ``needs`` name with their image runs' fold models where missing (else a no-op).

    Raises:
        UserError: image fold runs that have neither the embeddings nor a checkpoint to compute them with (all of
            them are named: they must be trained first).
    """
    todo = [(n, [s for s in n.splits if not embeddings_complete(n.fold_dir, s)]) for n in needs]
    todo = [(n, missing) for n, missing in todo if missing]
    untrained = [n for n, _ in todo if not (n.fold_dir / "best.pt").is_file()]
    if untrained:
        run = untrained[0].fold_dir.parent
        raise UserError(
            f"no embeddings and no best.pt to compute them with in {', '.join(str(n.fold_dir) for n in untrained)}: "
            f"train the image run first (rsna19 train <its config> --fold j for fold(s) "
            f"{', '.join(str(n.fold) for n in untrained)}), then `rsna19 embed {run} --fold j`"
        )
    for need, missing in todo:
        log.info("computing the %s embeddings of %s", ", ".join(missing), need.fold_dir)
        options = CheckpointOptions(tta=tta, device=device)
        extract_embeddings(need.fold_dir, need.fold, missing, options, cache=cache, folds=folds, progress=progress)
