"""Speed of the second level: feature building and level-2 CV time of the stackers on fake base-model predictions.

The predictions come from the test fixture ``tests/predfactory.py`` (realistic noise, contiguous bleeds), at a
realistic size, and the stackers use the settings of a stack config (default ``configs/stack/demo.yaml``).
Prints a markdown table.

Usage: python benchmarks/stack_speed.py [--slices 100000] [--models 4] [--stackers lgbm] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from _bench import add_common_arguments, apply_quick, write_json  # noqa: E402
from predfactory import DEFAULT_MODELS, FakeModel, _ar_noise, make_slices, predict  # noqa: E402

from rsna19.core.config import load_config  # noqa: E402
from rsna19.core.constants import CLASSES, PROB_COLUMNS  # noqa: E402
from rsna19.core.metrics import weighted_log_loss  # noqa: E402
from rsna19.stacking.config import StackConfig  # noqa: E402
from rsna19.stacking.cv import cross_fit  # noqa: E402
from rsna19.stacking.features import Level2Data, build_features  # noqa: E402
from rsna19.stacking.run import make_stackers  # noqa: E402

SLICES_PER_PATIENT = 26.7  # mean of predfactory's layout: 1.33 series of 12–28 slices


def fake_oof(n_slices: int, n_models: int, n_folds: int, seed: int = 0):
    """OOF-like predictions of ``n_models`` fake models for about ``n_slices`` slices."""
    rng = np.random.default_rng(seed)
    slices = make_slices(int(round(n_slices / SLICES_PER_PATIENT)), rng, set())
    patients = slices["patient_id"].unique()
    fold_of = dict(zip(rng.permutation(patients), np.arange(len(patients)) % n_folds))
    shared = _ar_noise(slices["series_uid"].to_numpy(), rng, 1.6, rho=0.85)
    preds = {}
    for i in range(n_models):
        base = DEFAULT_MODELS[i % len(DEFAULT_MODELS)]
        m = FakeModel(f"model{i}", base.signal, base.bias, base.iid, base.ar, base.temperature)
        df = slices.copy()
        df[list(PROB_COLUMNS)] = predict(slices, m, shared, rng)
        preds[m.name] = df
    return slices, preds, slices["patient_id"].map(fold_of).to_numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100_000)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--stackers", default="lgbm", help="comma-separated: lgbm, mlp, convex; '' = features only")
    parser.add_argument("--config", default=str(ROOT / "configs" / "stack" / "demo.yaml"))
    parser.add_argument("--threads", type=int, default=2, help="LightGBM / torch threads")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    apply_quick(args, slices=3000, models=2, folds=3, stackers="convex,lgbm", threads=1)

    overrides = [f"lgbm.num_threads={args.threads}", f"mlp.num_threads={args.threads}"]
    cfg = load_config(StackConfig, args.config, overrides)
    slices, preds, folds = fake_oof(args.slices, args.models, args.folds)
    y = slices.set_index("sop_uid").loc[:, list(CLASSES)]

    t0 = time.perf_counter()
    feats = build_features(preds, cfg.features.offsets, tuple(cfg.features.windows))
    feat_s = time.perf_counter() - t0
    data = Level2Data.from_features(feats, list(preds))
    y = y.loc[feats["sop_uid"]].to_numpy(float)
    folds = slices.set_index("sop_uid").loc[feats["sop_uid"]].index.map(dict(zip(slices["sop_uid"], folds))).to_numpy()
    best_base = min(weighted_log_loss(y, data.base[:, i]) for i in range(data.base.shape[1]))

    print(
        f"# level-2 speed: {len(feats)} slices × {args.models} models, {data.X.shape[1]} features, "
        f"{args.folds} folds, {args.threads} threads, {platform.processor() or platform.machine()}"
    )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"build_features: {feat_s:.2f} s; peak RSS {rss:.1f} GB; best base model OOF wll {best_base:.4f}\n")
    rows = [{"case": "build_features", "value": feat_s, "unit": "s"}]
    if not args.stackers:
        _write(args, rows, len(feats))
        return 0
    print("| stacker | level-2 CV (s) | per fold (s) | OOF wll | mean best iteration |")
    print("|---|---:|---:|---:|---:|")
    factories = make_stackers(cfg)
    for name in args.stackers.split(","):
        res = cross_fit(factories[name], data, y, folds, keep_models=True)
        iters = ""
        if name == "lgbm":
            its = [b.best_iteration for m in res.models.values() for b in m.boosters]
            iters = f"{np.mean(its):.0f}"
        wll = weighted_log_loss(y, res.oof)
        print(f"| {name} | {res.seconds:.1f} | {res.seconds / args.folds:.1f} | {wll:.4f} | {iters} |")
        rows.append({"case": f"{name} level-2 CV", "value": res.seconds, "unit": "s"})
    _write(args, rows, len(feats))
    return 0


def _write(args: argparse.Namespace, rows: list[dict], n_slices: int) -> None:
    write_json(
        args,
        "stack",
        f"Stack: {n_slices} slices × {args.models} models, {args.folds} folds, {args.threads} thread(s)",
        "features for 870k slices × 10 models in < 60 s (time here scales with slices × models)",
        rows,
        None,
        {"slices": args.slices, "models": args.models, "stackers": args.stackers},
    )


if __name__ == "__main__":
    sys.exit(main())
