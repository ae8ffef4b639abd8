"""Out-of-fold and test prediction of a trained run, with deterministic TTA (``rsna19 predict``).

``predict(run_dir, fold, split)`` loads ``best.pt`` (or ``last.pt``) of ``RUNS/<config>/fold_<k>`` into a
:class:`~rsna19.engine.predictor.Predictor`, lets the family's task list the slices and items to predict (every slice
of the fold's held-out patients for ``oof``, of the test split for ``test``), and writes ``oof.parquet`` /
``test.parquet`` in the schema of docs/contracts.md. Embeddings a sequence model reads are computed first when
missing (:func:`rsna19.engine.embed.ensure_embeddings`).

An image model whose embeddings of the split are current (written after ``best.pt`` with the same single TTA view)
is not run again: its embeddings hold the logits of the same forward pass over the same slices
(:mod:`rsna19.engine.embed`), and the predictions are their sigmoid (:func:`predictions_from_embeddings`). In a
pipeline that embeds an image model for a sequence model this halves the image model's inference (the demo:
~1 minute of its ~8).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.core.atomic import write_parquet
from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.data.datasets import slice_ids
from rsna19.data.embeddings import EMBED_COLUMNS, embedding_paths, embeddings_complete
from rsna19.engine.embed import CheckpointOptions, ensure_embeddings
from rsna19.engine.predictor import run_fold_dir

log = logging.getLogger(__name__)


def prediction_frame(rows: pd.DataFrame, probs: np.ndarray, fold: int, model_name: str, labels: bool) -> pd.DataFrame:
    """The prediction parquet table (docs/contracts.md) for ``rows`` of the cache index."""
    df = slice_ids(rows, fold)
    df["model"] = np.full(len(rows), model_name, dtype=object)
    for i, col in enumerate(PROB_COLUMNS):
        df[col] = probs[:, i].astype(np.float64)
    if labels:
        for c in CLASSES:
            df[c] = rows[c].to_numpy(dtype=np.float64)
    return df


def predict(
    run_dir: str | os.PathLike[str],
    fold: int,
    split: str = "oof",
    options: CheckpointOptions | None = None,
    cache: str | None = None,
    folds: str | None = None,
    progress: bool = True,
    out: str | os.PathLike[str] | None = None,
) -> Path:
    """Predict the out-of-fold or test slices of one fold's run and write the parquet.

    Args:
        run_dir: ``RUNS/<config name>`` or ``RUNS/<config name>/fold_<k>``.
        fold: the fold ``k``.
        split: ``oof`` (the fold's held-out training patients) or ``test`` (``split == "test"`` of the cache).
        options: checkpoint, TTA views, device, batch size and loader processes (defaults when None).
        cache, folds: override the paths recorded in the run's config.
        progress: show a progress bar.
        out: output path; defaults to ``<fold dir>/<split>.parquet``.

    Returns:
        The written parquet path.

    Raises:
        UserError: unknown split/checkpoint, a missing run or checkpoint, no slices to predict.
    """
    if split not in ("oof", "test"):
        raise UserError(f"--split must be oof or test, got {split!r}")
    options = options or CheckpointOptions()
    options.check()
    fold_dir = run_fold_dir(run_dir, fold)
    path = Path(out) if out else fold_dir / f"{split}.parquet"
    if not (cache or folds):  # the embeddings were computed on the run's own cache and folds
        reused = predictions_from_embeddings(fold_dir, split, options)
        if reused is not None:
            write_parquet(reused, path)
            log.info("wrote %s: %d slices from the logits of the fold's %s embeddings", path, len(reused), split)
            return path
    predictor, state = options.load(fold_dir)
    task = predictor.task
    cache = cache or os.environ.get("RSNA19_CACHE") or predictor.cfg.data.cache
    folds = folds or os.environ.get("RSNA19_FOLDS") or predictor.cfg.data.folds
    runs = fold_dir.parent.parent
    ensure_embeddings(task.required_embeddings(runs, fold, (split,)), cache, folds, options.device, progress=progress)
    rows, ds = task.prediction_data(state, fold_dir, fold, split, cache, folds)
    probs = predictor.predict_items(predictor.members[0], ds, len(rows), progress=progress, desc=f"{split} f{fold}")
    df = prediction_frame(rows, probs, fold, predictor.cfg.name, labels=split == "oof")
    write_parquet(df, path)
    log.info(
        "wrote %s: %d slices, TTA %s, checkpoint %s (epoch %d)",
        path,
        len(df),
        ",".join(predictor.views),
        options.checkpoint,
        state["epoch"],
    )
    return path


def predictions_from_embeddings(fold_dir: Path, split: str, options: CheckpointOptions) -> pd.DataFrame | None:
    """The prediction table of ``split`` from the fold's embeddings, or None when they cannot stand for a new pass.

    They can when they are complete (with logits), newer than ``best.pt``, from the ``best`` checkpoint and from
    the one TTA view asked for: then their ``logit_<class>`` columns are the logits of the same forward pass over
    the same slices (``oof``: the fold's held-out patients, ``test``: the test split), and their sigmoid is what a
    prediction pass would write (to float rounding). Several views are not reused: a prediction averages the
    views' probabilities, an embedding their logits.
    """
    paths = embedding_paths(fold_dir, split)
    best = fold_dir / "best.pt"
    views = list(options.tta)
    if options.checkpoint != "best" or len(views) != 1 or not best.is_file():
        return None
    if not embeddings_complete(fold_dir, split):
        return None
    info = json.loads(paths["json"].read_text(encoding="utf-8"))
    if info.get("checkpoint") != "best" or list(info.get("tta", [])) != views:
        return None
    if paths["json"].stat().st_mtime_ns <= best.stat().st_mtime_ns or not paths["parquet"].is_file():
        return None
    emb = pd.read_parquet(paths["parquet"])
    logits = emb[[f"logit_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)
    df = emb[[c for c in EMBED_COLUMNS if c != "split"]].copy()  # the identity columns of slice_ids()
    df["model"] = np.full(len(emb), str(info["model"]), dtype=object)
    probs = 1.0 / (1.0 + np.exp(-logits))
    for i, col in enumerate(PROB_COLUMNS):
        df[col] = probs[:, i]
    if split == "oof":
        for c in CLASSES:
            df[c] = emb[c].to_numpy(dtype=np.float64)
    return df.reset_index(drop=True)
