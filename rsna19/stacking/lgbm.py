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

from rsna19.core.constants import CLASSES
from rsna19.core.errors import UserError
from rsna19.core.threads import resolve_threads
from rsna19.stacking.base import Reader, inner_split
from rsna19.stacking.config import LgbmConfig
from rsna19.stacking.features import Level2Data
from rsna19.stacking.registry import register_stacker
from rsna19.stacking.start import check_start, fit_start, start_logit


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _bce(y: np.ndarray, logit: np.ndarray) -> float:
    """Mean binary cross-entropy of logits (stable form)."""
    return float(np.mean(np.logaddexp(0.0, logit) - y * logit))


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
        self.boosters: list[Any] = []  # per class: a Booster, a _Constant, or None (the start alone)
        self.start_weights: np.ndarray | None = None  # (M, 6) convex weights of the start, or None

    def params(self, n_rows: int | None = None, n_patients: int | None = None) -> dict[str, Any]:
        """LightGBM parameters; ``deterministic`` + seed make a run repeatable for a fixed thread count.

        With ``capacity: auto`` and the size of the training set given, the trees shrink with the number of
        patients: ``num_leaves ≤ max(4, patients // 8)`` and ``min_data_in_leaf ≥`` two patients' worth of slices
        (80 demo patients: 7 leaves of ≥ 48 slices; the RSNA set keeps the configured values).
        """
        c = self.cfg
        leaves, min_leaf = c.num_leaves, c.min_data_in_leaf
        if c.capacity == "auto" and n_rows and n_patients:
            leaves = min(leaves, max(4, n_patients // 8))
            min_leaf = max(min_leaf, int(round(2 * n_rows / n_patients)))
        elif c.capacity not in ("auto", "fixed"):
            raise UserError(f"lgbm.capacity must be auto or fixed, got {c.capacity!r}")
        return {
            "objective": "binary",
            "metric": "binary_logloss",
            "learning_rate": c.learning_rate,
            "num_leaves": leaves,
            "min_data_in_leaf": min_leaf,
            "feature_fraction": c.feature_fraction,
            "bagging_fraction": c.bagging_fraction,
            "bagging_freq": c.bagging_freq,
            "lambda_l2": c.lambda_l2,
            "max_bin": c.max_bin,
            "num_threads": resolve_threads(c.num_threads, "lgbm.num_threads"),
            "deterministic": True,
            "force_row_wise": True,
            "seed": self.seed,
            # The dataset is reused across classes, so its binning must not depend on per-class parameters.
            "feature_pre_filter": False,
            "verbosity": -1,
        }

    def _margin(self, data: Level2Data) -> np.ndarray:
        """(N, 6) starting logit: the convex blend of the base models, or zeros."""
        if self.start_weights is None:
            return np.zeros((len(data), len(CLASSES)))
        return start_logit(data.base, self.start_weights)

    def fit(self, data: Level2Data, y: np.ndarray) -> None:
        """Fit the six boosters on ``data`` (N rows), labels ``y`` (N, 6)."""
        import lightgbm as lgb

        check_start(self.cfg.start)
        self.start_weights = fit_start(data.base, y) if self.cfg.start == "convex" else None
        margin = self._margin(data)
        params = self.params(len(data), len(np.unique(data.groups)))
        self.boosters = []
        for c in range(len(CLASSES)):
            # Contiguous columns: LightGBM copies (and warns about) strided label and init-score arrays.
            labels, m = np.ascontiguousarray(y[:, c]), np.ascontiguousarray(margin[:, c])
            if labels.min() == labels.max():
                # LightGBM would boost towards log(0), and the start has no evidence either: a smoothed prior.
                self.boosters.append(_Constant((labels.sum() + 0.5) / (len(labels) + 1.0)))
                continue
            if self.cfg.inner_folds <= 1:
                self.boosters.append(self._fit_split(lgb, params, data, labels, m))
            else:
                self.boosters.append(self._fit_folds(lgb, params, data, labels, m))

    def _train(self, lgb: Any, params: dict[str, Any], X: np.ndarray, y: np.ndarray, m: np.ndarray, **kw: Any) -> Any:
        init = m if self.start_weights is not None else None
        return lgb.train(params, lgb.Dataset(X, label=y, init_score=init, params=params), **kw)

    def _early_stopped(
        self,
        lgb: Any,
        params: dict[str, Any],
        X: np.ndarray,
        labels: np.ndarray,
        margin: np.ndarray,
        tr: np.ndarray,
        va: np.ndarray,
    ) -> Any:
        """A booster on rows ``tr``, early-stopped on rows ``va`` (both boosting from the start when there is one)."""
        use_init = self.start_weights is not None
        dtrain = lgb.Dataset(X[tr], label=labels[tr], init_score=margin[tr] if use_init else None, params=params)
        dval = lgb.Dataset(X[va], label=labels[va], init_score=margin[va] if use_init else None, reference=dtrain)
        return lgb.train(
            params,
            dtrain,
            num_boost_round=self.cfg.num_boost_round,
            valid_sets=[dval],
            valid_names=["inner_val"],
            callbacks=[lgb.early_stopping(self.cfg.early_stopping_rounds, verbose=False), lgb.log_evaluation(0)],
        )

    def _fit_split(
        self, lgb: Any, params: dict[str, Any], data: Level2Data, labels: np.ndarray, margin: np.ndarray
    ) -> Any:
        """One patient-grouped inner split; the early-stopped booster itself."""
        tr, va = inner_split(data.groups, self.cfg.inner_val_fraction, self.seed)
        return self._early_stopped(lgb, params, data.X, labels, margin, tr, va)

    def _fit_folds(
        self, lgb: Any, params: dict[str, Any], data: Level2Data, labels: np.ndarray, margin: np.ndarray
    ) -> Any:
        """Rounds chosen on patient-grouped inner folds, then one booster on all rows (None: the start alone).

        A fold whose best iteration does not beat the start on its validation patients votes for 0 rounds.
        """
        patients = np.random.default_rng(self.seed).permutation(np.unique(data.groups))
        parts = [p for p in np.array_split(patients, min(self.cfg.inner_folds, len(patients))) if len(p)]
        votes = []
        for part in parts:
            va = np.isin(data.groups, part)
            tr = ~va
            if labels[va].min() == labels[va].max() or labels[tr].min() == labels[tr].max():
                continue  # no positive (or no negative) on one side: this fold cannot judge the rounds
            b = self._early_stopped(lgb, params, data.X, labels, margin, tr, va)
            votes.append(self._rounds(b, data.X, labels, margin, va))
        rounds = int(round(float(np.mean(votes)))) if votes else 0
        if rounds == 0:
            return None if self.start_weights is not None else _Constant(float(labels.mean()))
        return self._train(lgb, params, data.X, labels, margin, num_boost_round=rounds)

    def _rounds(self, b: Any, X: np.ndarray, labels: np.ndarray, margin: np.ndarray, va: np.ndarray) -> int:
        """Best number of rounds of the early-stopped booster ``b`` on rows ``va`` (0 when none beats the start)."""
        rounds = int(b.best_iteration or b.current_iteration())
        if self.start_weights is None:
            return rounds
        yv, m0 = labels[va], margin[va]
        m1 = m0 + b.predict(X[va], num_iteration=b.best_iteration or None, raw_score=True)
        return rounds if _bce(yv, m1) < _bce(yv, m0) else 0

    def predict(self, data: Level2Data) -> np.ndarray:
        """(N, 6) probabilities: the start's logit plus each class's boosted correction."""
        if not self.boosters:
            raise RuntimeError("LgbmStacker.predict before fit")
        margin = self._margin(data)
        out = np.empty((len(data), len(CLASSES)))
        for c, b in enumerate(self.boosters):
            if b is None:
                out[:, c] = _sigmoid(margin[:, c])
            elif isinstance(b, _Constant):
                out[:, c] = b.predict(data.X)
            elif self.start_weights is None:
                out[:, c] = b.predict(data.X, num_iteration=b.best_iteration or None)
            else:
                raw = b.predict(data.X, num_iteration=b.best_iteration or None, raw_score=True)
                out[:, c] = _sigmoid(margin[:, c] + raw)
        return out

    def feature_importance(self) -> dict[str, np.ndarray]:
        """Class → (F,) total gain of each feature (zeros for a constant class)."""
        out = {}
        for c, b in zip(CLASSES, self.boosters):
            out[c] = np.zeros(0) if b is None or isinstance(b, _Constant) else b.feature_importance("gain")
        return out

    def save(self, dest: Path) -> dict[str, Any]:
        """Write ``lgbm_<class>.txt`` per boosted class into ``dest``; constants, classes that keep the start
        (``start_only``) and the start's (M, 6) convex weights (``start_weights``) go into the returned info."""
        if len(self.boosters) != len(CLASSES):
            raise RuntimeError("LgbmStacker.save before fit")
        boosters: list[dict[str, Any]] = []
        for c, b in zip(CLASSES, self.boosters):
            if b is None:
                boosters.append({"class": c, "start_only": True})
            elif isinstance(b, _Constant):
                boosters.append({"class": c, "constant": float(b.p)})
            else:
                fname = f"lgbm_{c}.txt"
                # num_iteration=None: the best iteration when early stopping found one.
                (dest / fname).write_text(b.model_to_string(), encoding="utf-8")
                boosters.append({"class": c, "file": fname})
        info: dict[str, Any] = {"boosters": boosters}
        if self.start_weights is not None:
            info["start_weights"] = np.asarray(self.start_weights).tolist()
        return info

    @classmethod
    def load(cls, info: dict[str, Any], read: Reader) -> LgbmStacker:
        """The stacker :meth:`save` wrote (its boosters; the training config is not needed to predict)."""
        import lightgbm as lgb

        entries = info["boosters"]
        if [e["class"] for e in entries] != list(CLASSES):
            raise UserError(f"lgbm stacker: boosters for {[e['class'] for e in entries]}, expected {list(CLASSES)}")
        st = cls()
        if info.get("start_weights") is not None:  # bundles written before the residual start have none
            st.start_weights = np.asarray(info["start_weights"], dtype=np.float64)
            if st.start_weights.ndim != 2 or st.start_weights.shape[1] != len(CLASSES):
                raise UserError(f"lgbm stacker: start weights of shape {st.start_weights.shape}, expected (M, 6)")
        for e in entries:
            if e.get("start_only"):
                if st.start_weights is None:
                    raise UserError(f"lgbm stacker: class {e['class']} keeps a start the bundle does not hold")
                st.boosters.append(None)
                continue
            if "constant" in e:
                st.boosters.append(_Constant(float(e["constant"])))
                continue
            try:
                st.boosters.append(lgb.Booster(model_str=read(e["file"]).decode("utf-8")))
            except (lgb.basic.LightGBMError, UnicodeDecodeError) as exc:
                raise UserError(f"stacker file {e['file']}: not a LightGBM model: {exc}") from None
        return st
