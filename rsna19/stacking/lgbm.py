"""LightGBM stacker: one binary booster per class over the level-2 features.

Early stopping watches a patient-grouped inner validation split of the level-2 training folds (never the held-out
fold, which would leak into the level-2 OOF score). The binned training set is built once and reused for the six
classes by swapping labels.

In a bundle each class's booster is its LightGBM text dump ``lgbm_<class>.txt`` (``model_to_string``, best iteration
only); a class with a single label value in the training rows is a constant, recorded in ``stacker.json``.
LightGBM is imported when a stacker is fitted or loaded, so registering the stacker stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rsna19.constants import CLASSES
from rsna19.errors import UserError
from rsna19.stacking.base import Reader, inner_split
from rsna19.stacking.config import LgbmConfig
from rsna19.stacking.features import Level2Data
from rsna19.stacking.registry import register_stacker


class _Constant:
    """Stand-in booster for a class with a single label value in the training rows."""

    def __init__(self, p: float) -> None:
        self.p = p
        self.best_iteration = 0

    def predict(self, X: np.ndarray, num_iteration: int | None = None) -> np.ndarray:
        return np.full(len(X), self.p)


@register_stacker("lgbm", config=LgbmConfig)
class LgbmStacker:
    """Six binary LightGBM models (``lgb.train`` with the callbacks API)."""

    name = "lgbm"

    @classmethod
    def from_config(cls, cfg: LgbmConfig, seed: int = 0) -> LgbmStacker:
        """From the ``lgbm:`` section and the stack config's seed."""
        return cls(cfg, seed)

    def __init__(self, cfg: LgbmConfig | None = None, seed: int = 0) -> None:
        self.cfg = cfg or LgbmConfig()
        self.seed = seed
        self.boosters: list[Any] = []

    def params(self) -> dict[str, Any]:
        """LightGBM parameters; ``deterministic`` + seed make a run repeatable for a fixed thread count."""
        c = self.cfg
        return {
            "objective": "binary",
            "metric": "binary_logloss",
            "learning_rate": c.learning_rate,
            "num_leaves": c.num_leaves,
            "min_data_in_leaf": c.min_data_in_leaf,
            "feature_fraction": c.feature_fraction,
            "bagging_fraction": c.bagging_fraction,
            "bagging_freq": c.bagging_freq,
            "lambda_l2": c.lambda_l2,
            "max_bin": c.max_bin,
            "num_threads": c.num_threads,
            "deterministic": True,
            "force_row_wise": True,
            "seed": self.seed,
            # The dataset is reused across classes, so its binning must not depend on per-class parameters.
            "feature_pre_filter": False,
            "verbosity": -1,
        }

    def fit(self, data: Level2Data, y: np.ndarray) -> None:
        """Fit the six boosters on ``data`` (N rows), labels ``y`` (N, 6)."""
        import lightgbm as lgb

        params = self.params()
        tr, va = inner_split(data.groups, self.cfg.inner_val_fraction, self.seed)
        dtrain = lgb.Dataset(
            data.X[tr], label=y[tr, 0], feature_name=list(data.feature_names), params=params, free_raw_data=True
        ).construct()
        dval = lgb.Dataset(data.X[va], label=y[va, 0], reference=dtrain, params=params, free_raw_data=True).construct()
        self.boosters = []
        for c in range(len(CLASSES)):
            labels = y[tr, c]
            if labels.min() == labels.max():
                # LightGBM would boost towards log(0); a smoothed prior is the sensible model.
                self.boosters.append(_Constant((labels.sum() + 0.5) / (len(labels) + 1.0)))
                continue
            dtrain.set_label(labels)
            dval.set_label(y[va, c])
            booster = lgb.train(
                params,
                dtrain,
                num_boost_round=self.cfg.num_boost_round,
                valid_sets=[dval],
                valid_names=["inner_val"],
                callbacks=[lgb.early_stopping(self.cfg.early_stopping_rounds, verbose=False), lgb.log_evaluation(0)],
            )
            self.boosters.append(booster)

    def predict(self, data: Level2Data) -> np.ndarray:
        """(N, 6) probabilities from each class's best iteration."""
        if not self.boosters:
            raise RuntimeError("LgbmStacker.predict before fit")
        return np.column_stack([b.predict(data.X, num_iteration=b.best_iteration or None) for b in self.boosters])

    def feature_importance(self) -> dict[str, np.ndarray]:
        """Class → (F,) total gain of each feature (zeros for a constant class)."""
        out = {}
        for c, b in zip(CLASSES, self.boosters):
            out[c] = np.zeros(0) if isinstance(b, _Constant) else b.feature_importance("gain")
        return out

    def save(self, dest: Path) -> dict[str, Any]:
        """Write ``lgbm_<class>.txt`` per boosted class into ``dest``; constants go into the returned info."""
        if len(self.boosters) != len(CLASSES):
            raise RuntimeError("LgbmStacker.save before fit")
        boosters: list[dict[str, Any]] = []
        for c, b in zip(CLASSES, self.boosters):
            if isinstance(b, _Constant):
                boosters.append({"class": c, "constant": float(b.p)})
            else:
                fname = f"lgbm_{c}.txt"
                # num_iteration=None: the best iteration when early stopping found one.
                (dest / fname).write_text(b.model_to_string(), encoding="utf-8")
                boosters.append({"class": c, "file": fname})
        return {"boosters": boosters}

    @classmethod
    def load(cls, info: dict[str, Any], read: Reader) -> LgbmStacker:
        """The stacker :meth:`save` wrote (its boosters; the training config is not needed to predict)."""
        import lightgbm as lgb

        entries = info["boosters"]
        if [e["class"] for e in entries] != list(CLASSES):
            raise UserError(f"lgbm stacker: boosters for {[e['class'] for e in entries]}, expected {list(CLASSES)}")
        st = cls()
        for e in entries:
            if "constant" in e:
                st.boosters.append(_Constant(float(e["constant"])))
                continue
            try:
                st.boosters.append(lgb.Booster(model_str=read(e["file"]).decode("utf-8")))
            except (lgb.basic.LightGBMError, UnicodeDecodeError) as exc:
                raise UserError(f"stacker file {e['file']}: not a LightGBM model: {exc}") from None
        return st
