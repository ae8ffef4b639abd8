"""The stack split into jobs: features once, every level-2 fit (stacker × fold) on its own, one final job.

``rsna19 stack CONFIG --part features`` builds the level-2 problem once and saves it as plain ``.npy`` arrays;
``--part fit --stacker S --fold K`` loads them memory-mapped and runs :func:`rsna19.stacking.cv.fit_fold`, the
exact function the single-job stack runs for that fold; ``--part finish`` combines the fold fits
(:func:`rsna19.stacking.cv.combine_folds`), post-processes, blends and writes the stack folder exactly as
``rsna19 stack`` does in one process (:func:`rsna19.stacking.run.run_stack`), so both give identical files.

Layout (``<out>/<name>-parts/``, next to the stack folder ``<out>/<name>/``)::

    level2/meta.json              models, feature names, folds present, test sets; written last (marks it done)
    level2/oof_keys.parquet       key columns of the OOF rows (sorted by series, slice), test_keys.parquet
    level2/oof_X.npy, oof_base.npy, y.npy, folds.npy     (N, F) float32, (N, M, 6) float32, (N, 6), (N,)
    level2/test_X.npy, test_base.npy[, y_test.npy]       the fold-averaged test features
    level2/test_fold<k>_X.npy, test_fold<k>_base.npy     per base fold (``features.test_per_fold``)
    fits/<stacker>/fold_<k>.npz   one level-2 fold fit: held-out rows' probabilities, test mean, train patients
    fits/<stacker>/fold_<k>/      the fitted stacker's own files (its ``save``), for the stackers whose fold models
                                  the stack reports (convex: ``weights.json``)

Each file and folder is written atomically; a fit is current when it is newer than ``level2/meta.json``, which is
newer than every base-model parquet, so a re-run redoes only what is stale.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.core.atomic import atomic_path, ensure_writable_dir, remove_stale_temporaries
from rsna19.core.errors import UserError
from rsna19.stacking.config import StackConfig
from rsna19.stacking.cv import CrossFitResult, FoldFit, combine_folds, fit_fold
from rsna19.stacking.features import SEP, Level2Data
from rsna19.stacking.inputs import KEY_COLUMNS, load_base_inputs
from rsna19.stacking.registry import get_stacker_spec, make_stackers
from rsna19.stacking.run import (
    DONE_FILE,
    Level2Set,
    StackResult,
    finish_stackers,
    prepare_level2,
    stack_dir,
    write_stack,
)

log = logging.getLogger(__name__)

#: Steps of a split stack, in order (``rsna19 stack --part``).
PARTS: tuple[str, ...] = ("features", "fit", "finish")
#: Stackers whose fitted fold models the stack keeps (their weights go into ``weights.json``).
KEEP_MODELS: tuple[str, ...] = ("convex",)


def parts_dir(cfg: StackConfig) -> Path:
    """``<out>/<name>-parts``: the split stack's intermediate files."""
    return Path(cfg.out) / f"{cfg.name}-parts"


def level2_dir(cfg: StackConfig) -> Path:
    """``<out>/<name>-parts/level2``: the saved level-2 problem."""
    return parts_dir(cfg) / "level2"


def level2_done_file(cfg: StackConfig) -> Path:
    """``level2/meta.json``, written last: its presence marks the features as complete."""
    return level2_dir(cfg) / "meta.json"


def fit_path(cfg: StackConfig, stacker: str, fold: int) -> Path:
    """``fits/<stacker>/fold_<k>.npz``: one level-2 fold fit."""
    return parts_dir(cfg) / "fits" / stacker / f"fold_{int(fold)}.npz"


# ------------------------------------------------------------------------------------------------ level-2 set
def save_level2(l2: object, dest: Path) -> Path:
    """Write a :class:`rsna19.stacking.run.Level2Set` as ``.npy`` arrays (atomically, ``meta.json`` last).

    Args:
        l2: the level-2 problem.
        dest: the ``level2`` folder (replaced as a whole).
    """
    with atomic_path(dest) as tmp:
        tmp.mkdir(parents=True)
        l2.oof_features[list(KEY_COLUMNS)].to_parquet(tmp / "oof_keys.parquet", index=False)
        l2.test_features[list(KEY_COLUMNS)].to_parquet(tmp / "test_keys.parquet", index=False)
        arrays = {"oof_X": l2.oof.X, "oof_base": l2.oof.base, "y": l2.y, "folds": l2.folds}
        arrays.update({"test_X": l2.test.X, "test_base": l2.test.base})
        if l2.y_test is not None:
            arrays["y_test"] = l2.y_test
        for k, d in enumerate(l2.test_folds):
            arrays[f"test_fold{k}_X"], arrays[f"test_fold{k}_base"] = d.X, d.base
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", a, allow_pickle=False)  # C or Fortran order kept: the same sums
        meta = {
            "models": list(l2.models),
            "feature_names": list(l2.oof.feature_names),
            "folds": sorted(int(k) for k in np.unique(l2.folds)),
            "test_sets": len(l2.test_folds),
            "has_test_labels": l2.y_test is not None,
            "rows": [len(l2.oof), len(l2.test)],
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return dest


def load_level2(src: Path, mmap: bool = True) -> object:
    """The :class:`rsna19.stacking.run.Level2Set` :func:`save_level2` wrote; feature matrices memory-mapped.

    Raises:
        UserError: the folder is missing or incomplete (run ``--part features`` first).
    """
    if not (src / "meta.json").is_file():
        raise UserError(f"{src}: no level-2 features (run `rsna19 stack CONFIG --part features` first)")
    meta = json.loads((src / "meta.json").read_text(encoding="utf-8"))
    mode = "r" if mmap else None

    def arr(name: str) -> np.ndarray:
        path = src / f"{name}.npy"
        try:
            return np.load(path, mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read the level-2 array: {exc}") from None

    names = list(meta["feature_names"])
    prob_mask = np.array([SEP in n for n in names])
    oof_keys = pd.read_parquet(src / "oof_keys.parquet")
    test_keys = pd.read_parquet(src / "test_keys.parquet")
    g_oof, g_test = oof_keys["patient_id"].to_numpy(), test_keys["patient_id"].to_numpy()
    test_folds = [
        Level2Data(arr(f"test_fold{k}_X"), names, prob_mask, arr(f"test_fold{k}_base"), g_test)
        for k in range(int(meta["test_sets"]))
    ]
    return Level2Set(
        models=list(meta["models"]),
        oof_features=oof_keys,
        test_features=test_keys,
        oof=Level2Data(arr("oof_X"), names, prob_mask, arr("oof_base"), g_oof),
        test=Level2Data(arr("test_X"), names, prob_mask, arr("test_base"), g_test),
        y=np.asarray(arr("y")),
        folds=np.asarray(arr("folds")),
        y_test=np.asarray(arr("y_test")) if meta["has_test_labels"] else None,
        test_folds=test_folds,
    )


# ------------------------------------------------------------------------------------------------ fold fits
def save_fold_fit(fit: FoldFit, path: Path) -> Path:
    """Write one fold fit (``.npz``; the fitted stacker through its own ``save`` into ``fold_<k>/`` when kept)."""
    info: dict[str, object] = {}
    if fit.model is not None:
        model_dir = path.with_suffix("")
        with atomic_path(model_dir) as tmp:
            tmp.mkdir(parents=True)
            info = fit.model.save(tmp)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            oof=fit.oof,
            test=fit.test,
            train_patients=np.asarray(fit.train_patients, dtype=str),
            seconds=np.float64(fit.seconds),
            meta=np.asarray(json.dumps({"name": fit.name, "fold": fit.fold, "model": info})),
        )
    return path


def load_fold_fit(path: Path) -> FoldFit:
    """The fold fit :func:`save_fold_fit` wrote (with its stacker when it was kept).

    Raises:
        UserError: a missing or unreadable file.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            fit = FoldFit(
                meta["name"],
                int(meta["fold"]),
                z["oof"],
                z["test"],
                z["train_patients"].astype(object),
                float(z["seconds"]),
            )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: not a level-2 fold fit ({exc}); run its `--part fit` job again") from None
    if meta["model"]:
        model_dir = path.with_suffix("")
        fit.model = get_stacker_spec(fit.name).cls.load(meta["model"], lambda rel: (model_dir / rel).read_bytes())
    return fit


# ------------------------------------------------------------------------------------------------ the parts
def run_features(cfg: StackConfig) -> Path:
    """``--part features``: load the base models' predictions, build the level-2 problem and save it."""
    t0 = time.perf_counter()
    inputs = load_base_inputs(cfg.runs, list(cfg.models), cfg.folds_csv, list(cfg.folds), cfg.test_labels)
    l2 = prepare_level2(inputs, cfg.features.offsets, tuple(cfg.features.windows), cfg.features.test_per_fold)
    del inputs
    out = save_level2(l2, level2_dir(cfg))
    log.info("level-2 features: %d OOF rows × %d features in %.1f s", *l2.oof.X.shape, time.perf_counter() - t0)
    return out


def run_fit(cfg: StackConfig, stacker: str, fold: int) -> Path:
    """``--part fit``: one stacker on one level-2 fold, from the saved features.

    Raises:
        UserError: a stacker that is not enabled, or a fold the level-2 rows do not have.
    """
    factories = make_stackers(cfg)
    if stacker not in factories:
        raise UserError(f"stacker {stacker!r} is not enabled in {cfg.name}; enabled: {', '.join(factories)}")
    l2 = load_level2(level2_dir(cfg))
    if int(fold) not in set(np.unique(l2.folds).tolist()):
        raise UserError(f"fold {fold} is not a level-2 fold of {cfg.name} (folds {sorted(set(l2.folds.tolist()))})")
    fit = fit_fold(factories[stacker], l2.oof, l2.y, l2.folds, int(fold), l2.test_sets, stacker in KEEP_MODELS)
    log.info("level-2 fit %s fold %d: %.1f s", stacker, fold, fit.seconds)
    return save_fold_fit(fit, fit_path(cfg, stacker, fold))


def load_fits(cfg: StackConfig, folds: np.ndarray) -> dict[str, CrossFitResult]:
    """Every enabled stacker's cross-fit result, combined from its saved fold fits.

    Raises:
        UserError: a fold fit that is missing (its job has not run).
    """
    out: dict[str, CrossFitResult] = {}
    for name in make_stackers(cfg):
        parts = []
        for k in np.unique(folds):
            path = fit_path(cfg, name, int(k))
            if not path.is_file():
                raise UserError(f"{path}: missing; run `rsna19 stack CONFIG --part fit --stacker {name} --fold {k}`")
            parts.append(load_fold_fit(path))
        out[name] = combine_folds(parts, folds)
    return out


def fit_jobs(cfg: StackConfig, n_folds: int) -> list[tuple[str, int]]:
    """(stacker, fold) of every level-2 fit job: each enabled stacker × each fold (``folds`` or 0..n_folds−1)."""
    folds = list(cfg.folds) or list(range(n_folds))
    return [(name, int(k)) for name in make_stackers(cfg) for k in folds]


def fits_current(cfg: StackConfig, stacker: str, fold: int) -> bool:
    """The fit exists and is newer than the level-2 features it was made from."""
    path, features = fit_path(cfg, stacker, fold), level2_done_file(cfg)
    return path.is_file() and features.is_file() and os.stat(path).st_mtime_ns >= os.stat(features).st_mtime_ns


def finish_stack(cfg: StackConfig, force: bool = False) -> StackResult:
    """The final job of a split stack (``rsna19 stack --part finish``): combine the saved fold fits
    (:func:`load_fits`), post-process, blend and write the stack folder as :func:`~rsna19.stacking.run.run_stack` does.

    Raises:
        UserError: the features or a fold fit are missing.
    """
    out_dir = stack_dir(cfg)
    if (out_dir / DONE_FILE).is_file() and not force:
        log.info("stack output %s is complete; skipping (use --force to recompute)", out_dir)
        return StackResult(out_dir, pd.read_csv(out_dir / DONE_FILE), skipped=True)
    ensure_writable_dir(out_dir.parent)
    remove_stale_temporaries(out_dir)
    t0 = time.perf_counter()
    # Read into memory, not mapped: numpy's sums depend on the buffer's alignment in their last bit, and the scores
    # must be those of the single job.
    l2 = load_level2(level2_dir(cfg), mmap=False)
    stackers = load_fits(cfg, l2.folds)
    timings = {"load_s": time.perf_counter() - t0}
    timings.update({f"{name}_cv_s": r.seconds for name, r in stackers.items()})
    stackers, blend = finish_stackers(cfg, l2, stackers)
    return write_stack(cfg, l2, stackers, blend, timings)
