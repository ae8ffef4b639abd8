"""The ``stack`` stage: base-model predictions → level-2 features → stackers by level-2 CV → blend → outputs.

Output (written as one directory, atomically; a finished one is skipped unless ``force``)::

    <out>/<name>/oof.parquet     key columns, fold, model (mean / convex / lgbm / mlp / blend), p_<class> ×6, labels
    <out>/<name>/test.parquet    key columns, fold (−1), model, p_<class> ×6
    <out>/<name>/scores.csv      name, kind, wll_oof, wll_test, loss_<class> ×6, auc_any (OOF slice),
                                 auc_any_test, study_auc_oof, study_auc_test, wll_oof_raw, postprocess,
                                 d_any_ge_max, d_clip, vs_best_base, warning (rsna19.stacking.report)
    <out>/<name>/scores.png      the score table as a bar chart (every base model, stacker and the blend)
    <out>/<name>/weights.json    convex (per level-2 fold) and blend weights, the post-processing each output keeps
    <out>/<name>/timings.json    seconds per step
    <out>/<name>/config.yaml     the resolved config, with the base models actually used

Example (one line on a finished demo run)::

    run_stack(load_config(StackConfig, "configs/stack/demo.yaml", ["runs=demo_out/runs"]))
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from rsna19.core.atomic import (
    atomic_path,
    ensure_writable_dir,
    remove_stale_temporaries,
    write_parquet,
    write_text,
)
from rsna19.core.config import save_config
from rsna19.core.constants import CLASSES, PROB_COLUMNS
from rsna19.core.errors import UserError
from rsna19.stacking.base import Stacker
from rsna19.stacking.blend import BASE_PREFIX, BlendResult, fall_back_to_base, fit_blend
from rsna19.stacking.config import StackConfig
from rsna19.stacking.cv import CrossFitResult, cross_fit
from rsna19.stacking.features import Level2Data, build_features
from rsna19.stacking.inputs import KEY_COLUMNS, BaseInputs, load_base_inputs
from rsna19.stacking.postprocess import fit_postprocess
from rsna19.stacking.registry import make_stackers as _registry_make_stackers
from rsna19.stacking.report import flag_against_base, format_score_table, score_frame, score_row
from rsna19.viz.plots import plot_safely, plot_score_table

log = logging.getLogger(__name__)

#: Marker of a finished stack directory (written last inside the atomically renamed directory).
DONE_FILE = "scores.csv"


@dataclass
class Level2Set:
    """The level-2 problem: features, labels and folds of the OOF rows, and features of the test rows.

    Attributes:
        models: base model names (order of ``Level2Data.base``'s model axis).
        oof_features, test_features: frames from :func:`build_features` (sorted by series, slice).
        oof, test: the same as matrices for the stackers.
        y: (N, 6) OOF labels; folds: (N,) fold of each OOF row; y_test: (N_test, 6) or None.
        test_folds: with ``features.test_per_fold``, the test features built from each base fold's predictions
            alone, one :class:`Level2Data` a fold in ``test_features``' row order; empty otherwise.
    """

    models: list[str]
    oof_features: pd.DataFrame
    test_features: pd.DataFrame
    oof: Level2Data
    test: Level2Data
    y: np.ndarray
    folds: np.ndarray
    y_test: np.ndarray | None = None
    test_folds: list[Level2Data] = field(default_factory=list)

    @property
    def test_sets(self) -> list[Level2Data]:
        """What a level-2 model predicts for the test rows, its predictions averaged: each fold's features, or the
        features of the fold-averaged predictions."""
        return self.test_folds or [self.test]


def prepare_level2(
    inputs: BaseInputs, offsets: int = 2, windows: tuple[int, ...] = (3, 5), test_per_fold: bool = False
) -> Level2Set:
    """Build features for OOF and test rows and align labels and folds with them.

    With ``test_per_fold`` the test features are also built from each base fold's predictions alone
    (:attr:`Level2Set.test_folds`)."""
    oof_feats = build_features(inputs.oof, offsets, windows)
    test_feats = build_features(inputs.test, offsets, windows)
    test_folds = []
    if test_per_fold:
        for k in inputs.folds:
            feats_k = build_features(inputs.test_folds[k], offsets, windows)
            if not np.array_equal(feats_k["sop_uid"].to_numpy(), test_feats["sop_uid"].to_numpy()):
                raise UserError(f"test features of base fold {k} do not line up with the fold-averaged ones")
            test_folds.append(Level2Data.from_features(feats_k, inputs.models))
    ref = inputs.oof[inputs.models[0]].set_index("sop_uid")
    y = np.ascontiguousarray(ref.loc[oof_feats["sop_uid"], list(CLASSES)].to_numpy(np.float64))
    folds = oof_feats["patient_id"].map(inputs.fold_of_patient).to_numpy(int)
    y_test = None
    if inputs.test_labels is not None:
        y_test = np.ascontiguousarray(inputs.test_labels.loc[test_feats["sop_uid"], list(CLASSES)].to_numpy(np.float64))
    return Level2Set(
        models=list(inputs.models),
        oof_features=oof_feats,
        test_features=test_feats,
        oof=Level2Data.from_features(oof_feats, inputs.models),
        test=Level2Data.from_features(test_feats, inputs.models),
        y=y,
        folds=folds,
        y_test=y_test,
        test_folds=test_folds,
    )


def make_stackers(cfg: StackConfig) -> dict[str, Callable[[], Stacker]]:
    """Factories of the enabled stackers, by name: every registered stacker whose config section is enabled
    (:func:`rsna19.stacking.registry.make_stackers`)."""
    return _registry_make_stackers(cfg)


@dataclass
class StackResult:
    """What :func:`run_stack` produced.

    Attributes:
        out_dir: the stack directory.
        scores: the score table (``scores.csv``).
        skipped: True when a finished output was found and nothing was recomputed.
        oof, test: method name → (N, 6) / (N_test, 6) final probabilities (empty when skipped).
        timings: step → seconds.
        level2: the level-2 problem (None when skipped).
        stackers: name → cross-fit result; blend: the blend (None when skipped or disabled).
    """

    out_dir: Path
    scores: pd.DataFrame
    skipped: bool = False
    oof: dict[str, np.ndarray] = field(default_factory=dict)
    test: dict[str, np.ndarray] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    level2: Level2Set | None = None
    stackers: dict[str, CrossFitResult] = field(default_factory=dict)
    blend: BlendResult | None = None


def blend_members(cfg: StackConfig, stackers: list[str], models: list[str]) -> list[str]:
    """The blend's members: ``blend.members`` (or every enabled stacker), then ``base:<model>`` for every base
    model when ``blend.include_base`` is set."""
    members = list(cfg.blend.members) or list(stackers)
    if cfg.blend.include_base:
        members += [f"{BASE_PREFIX}{m}" for m in models]
    return members


def fit_stackers(cfg: StackConfig, l2: Level2Set) -> tuple[dict[str, CrossFitResult], BlendResult | None]:
    """Level-2 CV of every enabled stacker, then :func:`finish_stackers` (post-processing, blend, fallback)."""
    results: dict[str, CrossFitResult] = {}
    for name, factory in make_stackers(cfg).items():
        log.info("level-2 CV: %s on %d rows × %d features, %d folds", name, *l2.oof.X.shape, len(set(l2.folds)))
        results[name] = cross_fit(factory, l2.oof, l2.y, l2.folds, l2.test_sets, keep_models=name == "convex")
        log.info("level-2 CV: %s done in %.1f s", name, results[name].seconds)
    return finish_stackers(cfg, l2, results)


def finish_stackers(
    cfg: StackConfig, l2: Level2Set, results: dict[str, CrossFitResult]
) -> tuple[dict[str, CrossFitResult], BlendResult | None]:
    """Post-process each stacker's output, blend them (and, with ``blend.include_base``, the base models' own
    probabilities), post-process the blend and apply the fallback to that final output.

    Every post-processing step is chosen per output on its level-2 OOF rows and kept only when it lowers their
    loss (:func:`rsna19.stacking.postprocess.fit_postprocess`). The blend's cross-fitted weights pick the stackers
    only where they beat the single models on held-out folds; with ``blend.fallback`` the blend whose final OOF
    output does not beat its best ``base:<model>`` member *is* that member (with its own kept steps).

    Args:
        cfg: the stack config.
        l2: the level-2 problem.
        results: stacker name → its raw cross-fit result (changed in place: post-processed, ``postprocess`` set).

    Returns:
        The post-processed stackers and the blend (None when disabled or without members).

    Raises:
        UserError: ``blend.members`` names a stacker that is not enabled.
    """
    pp = cfg.postprocess
    for name, res in results.items():
        res.postprocess = fit_postprocess(res.oof, l2.y, pp.any_ge_max, pp.clip)
        res.oof, res.test = res.postprocess.apply(res.oof), res.postprocess.apply(res.test)
        log.info("post-processing of %s: %s", name, res.postprocess.label)
    blend = None
    unknown = sorted(set(cfg.blend.members) - set(results))
    if unknown:
        raise UserError(f"blend.members names stacker(s) {unknown} that are not enabled; enabled: {list(results)}")
    members = blend_members(cfg, list(results), l2.models)
    if cfg.blend.enabled and members:
        base_oof = {f"{BASE_PREFIX}{m}": l2.oof.base[:, i].astype(np.float64) for i, m in enumerate(l2.models)}
        base_test = {f"{BASE_PREFIX}{m}": l2.test.base[:, i].astype(np.float64) for i, m in enumerate(l2.models)}
        oof = {m: results[m].oof if m in results else base_oof[m] for m in members}
        test = {m: results[m].test if m in results else base_test[m] for m in members}
        blend = fit_blend(oof, test, l2.y, l2.folds, cfg.blend.per_class)
        fit = fit_postprocess(blend.oof, l2.y, pp.any_ge_max, pp.clip)
        final = fit.apply(blend.oof)
        if cfg.blend.fallback:
            blend = fall_back_to_base(blend, oof, test, l2.y, final)
        if blend.fallback:
            log.info("blend: its final output did not beat %s on OOF; the blend is that model", blend.fallback)
            fit = fit_postprocess(blend.oof, l2.y, pp.any_ge_max, pp.clip)
            final = fit.apply(blend.oof)
        blend.oof, blend.test, blend.postprocess = final, fit.apply(blend.test), fit
        log.info("post-processing of the blend: %s", fit.label)
    return results, blend


def score_stack(
    l2: Level2Set, stackers: dict[str, CrossFitResult], blend: BlendResult | None
) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Score table plus the final OOF and test probabilities of the plain mean, each stacker and the blend.

    The table says what post-processing did to each stacker and the blend, and flags the final output (the blend;
    every stacker when there is none) when it is worse than the best base model out of fold
    (:func:`rsna19.stacking.report.flag_against_base`)."""
    so, st = l2.oof_features["study_uid"].to_numpy(), l2.test_features["study_uid"].to_numpy()

    def row(name: str, kind: str, p_oof: np.ndarray, p_test: np.ndarray, post: object = None) -> dict[str, object]:
        return score_row(name, kind, l2.y, p_oof, l2.y_test, p_test, so, st, post)  # type: ignore[arg-type]

    rows = [row(m, "base", l2.oof.base[:, i], l2.test.base[:, i]) for i, m in enumerate(l2.models)]
    oof = {"mean": l2.oof.base.mean(axis=1, dtype=np.float64)}
    test = {"mean": l2.test.base.mean(axis=1, dtype=np.float64)}
    rows.append(row("mean", "mean", oof["mean"], test["mean"]))
    for name, res in stackers.items():
        oof[name], test[name] = res.oof, res.test
        rows.append(row(name, "stacker", res.oof, res.test, res.postprocess))
    if blend is not None:
        oof["blend"], test["blend"] = blend.oof, blend.test
        rows.append(row("blend", "blend", blend.oof, blend.test, blend.postprocess))
    final = ["blend"] if blend is not None else list(stackers)
    scores, _ = flag_against_base(score_frame(rows), final)
    return scores, oof, test


def postprocess_decisions(stackers: dict[str, CrossFitResult], blend: BlendResult | None) -> dict[str, object]:
    """Output name → the post-processing it keeps (``{"any_ge_max": bool, "clip": margin or 0}``), for
    ``weights.json`` and bundles."""
    out: dict[str, object] = {n: r.postprocess.to_json() for n, r in stackers.items() if r.postprocess is not None}
    if blend is not None and blend.postprocess is not None:
        out["blend"] = blend.postprocess.to_json()
    return out


def stack_warnings(scores: pd.DataFrame) -> list[str]:
    """One line per row of ``scores`` with a ``warning`` (a final output worse than the best base model OOF)."""
    if "warning" not in scores.columns:
        return []
    flagged = scores[scores["warning"].fillna("").astype(str) != ""]
    return [f"{r['name']}: {r['warning']}" for _, r in flagged.iterrows()]


def predictions_frame(
    features: pd.DataFrame, preds: dict[str, np.ndarray], fold: np.ndarray | int, labels: np.ndarray | None = None
) -> pd.DataFrame:
    """Long prediction frame in the contract's schema: one row per slice and method (``model`` column)."""
    keys = features[list(KEY_COLUMNS)].reset_index(drop=True)
    parts = []
    for name, p in preds.items():
        df = keys.copy()
        df["fold"] = fold
        df["model"] = name
        df[list(PROB_COLUMNS)] = np.asarray(p, dtype=np.float64)
        if labels is not None:
            df[list(CLASSES)] = labels
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def stack_dir(cfg: StackConfig) -> Path:
    """``<out>/<name>``."""
    return Path(cfg.out) / cfg.name


def run_stack(cfg: StackConfig, force: bool = False) -> StackResult:
    """Run the whole second level for ``cfg``.

    Args:
        cfg: the stack config (paths already resolved by the caller).
        force: recompute even if ``<out>/<name>/scores.csv`` exists.

    Returns:
        The result; ``skipped`` when a finished output was reused.
    """
    out_dir = stack_dir(cfg)
    if (out_dir / DONE_FILE).is_file() and not force:
        log.info("stack output %s is complete; skipping (use --force to recompute)", out_dir)
        return StackResult(out_dir, pd.read_csv(out_dir / DONE_FILE), skipped=True)
    ensure_writable_dir(out_dir.parent)  # fail before the level-2 CV, not after it
    remove_stale_temporaries(out_dir)  # left by a run that was killed while writing
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    inputs = load_base_inputs(cfg.runs, list(cfg.models), cfg.folds_csv, list(cfg.folds), cfg.test_labels)
    timings["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    l2 = prepare_level2(inputs, cfg.features.offsets, tuple(cfg.features.windows), cfg.features.test_per_fold)
    del inputs  # the level-2 matrices hold what the stackers need; at RSNA size the raw tables are gigabytes
    l2.oof_features = l2.oof_features[list(KEY_COLUMNS)]  # the feature columns are in l2.oof.X already
    l2.test_features = l2.test_features[list(KEY_COLUMNS)]
    timings["features_s"] = time.perf_counter() - t0
    log.info("features: %d OOF and %d test rows × %d features", len(l2.oof), len(l2.test), l2.oof.X.shape[1])
    stackers, blend = fit_stackers(cfg, l2)
    timings.update({f"{name}_cv_s": r.seconds for name, r in stackers.items()})
    return write_stack(cfg, l2, stackers, blend, timings)


def write_stack(
    cfg: StackConfig,
    l2: Level2Set,
    stackers: dict[str, CrossFitResult],
    blend: BlendResult | None,
    timings: dict[str, float],
) -> StackResult:
    """Score the outputs and write the stack folder atomically (``scores.csv`` last); warn about a final output
    that is worse than the best base model out of fold."""
    out_dir = stack_dir(cfg)
    t0 = time.perf_counter()
    scores, oof, test = score_stack(l2, stackers, blend)
    weights: dict[str, object] = {"classes": list(CLASSES), "base_models": l2.models}
    if "convex" in stackers:
        weights["convex_per_fold"] = {
            str(k): np.asarray(m.weights).tolist() for k, m in stackers["convex"].models.items()
        }
    if blend is not None:
        weights["blend"] = {"members": blend.members, "weights": blend.weights.tolist(), "fallback": blend.fallback}
    weights["postprocess"] = postprocess_decisions(stackers, blend)
    for line in stack_warnings(scores):
        log.warning("stack %s: %s", cfg.name, line)
    resolved = dataclasses.replace(cfg, models=l2.models, folds=sorted(int(k) for k in set(l2.folds)))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        predictions_frame(l2.oof_features, oof, l2.folds, l2.y).to_parquet(tmp / "oof.parquet", index=False)
        predictions_frame(l2.test_features, test, -1).to_parquet(tmp / "test.parquet", index=False)
        write_text(json.dumps(weights, indent=2), tmp / "weights.json")
        timings["write_s"] = time.perf_counter() - t0
        write_text(json.dumps(timings, indent=2), tmp / "timings.json")
        save_config(resolved, tmp / "config.yaml")

        plot_safely(plot_score_table, scores, tmp / "scores.png", f"stack {cfg.name}")
        scores.to_csv(tmp / DONE_FILE, index=False)
    log.info("stack output written to %s", out_dir)
    return StackResult(out_dir, scores, False, oof, test, timings, l2, stackers, blend)


def write_features(cfg: StackConfig, out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Build and save the level-2 features (for inspection or other stackers).

    Writes ``features_oof.parquet`` (key columns, ``fold``, labels, features) and ``features_test.parquet``
    (key columns, features) to ``out_dir``, default ``<out>/<name>-features``.
    """
    out_dir = Path(out_dir) if out_dir is not None else Path(cfg.out) / f"{cfg.name}-features"
    inputs = load_base_inputs(cfg.runs, list(cfg.models), cfg.folds_csv, list(cfg.folds), cfg.test_labels)
    l2 = prepare_level2(inputs, cfg.features.offsets, tuple(cfg.features.windows))  # the written features only
    oof = l2.oof_features.copy()
    oof.insert(len(KEY_COLUMNS), "fold", l2.folds)
    labels = pd.DataFrame(l2.y, columns=list(CLASSES))
    oof = pd.concat([oof.iloc[:, : len(KEY_COLUMNS) + 1], labels, oof.iloc[:, len(KEY_COLUMNS) + 1 :]], axis=1)
    write_parquet(oof, out_dir / "features_oof.parquet")
    write_parquet(l2.test_features, out_dir / "features_test.parquet")
    return out_dir


def print_scores(result: StackResult) -> None:
    """Print the score table (with its warnings) and the LightGBM level-2 CV time."""
    print(format_score_table(result.scores))
    if "lgbm_cv_s" in result.timings:
        print(f"LightGBM level-2 CV: {result.timings['lgbm_cv_s']:.1f} s")
