"""Level-2 cross-validation on the base models' patient-grouped folds.

For each fold k, a fresh stacker is fitted on the OOF features of the other folds and predicts fold k, so every
level-2 OOF prediction comes from a model that never saw its patient; the test prediction is the mean of the
fold models' predictions. Each fold is one :func:`fit_fold`, so a split stack can run the folds as separate jobs
and :func:`combine_folds` them into the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rsna19.core.constants import CLASSES
from rsna19.stacking.base import Stacker
from rsna19.stacking.features import Level2Data


@dataclass
class CrossFitResult:
    """Out-of-fold and test predictions of one stacker.

    Attributes:
        name: the stacker's name.
        oof: (N, 6) level-2 OOF probabilities.
        test: (N_test, 6) mean of the fold models' test probabilities.
        train_patients: fold k → the patients the fold-k model was trained on.
        seconds: wall time of the whole CV (fit and predict; the sum of the folds' when they ran as jobs).
        models: fold k → the fitted stacker.
        postprocess: the post-processing steps kept for this output
            (:class:`rsna19.stacking.postprocess.PostprocessFit`), None before they are chosen.
    """

    name: str
    oof: np.ndarray
    test: np.ndarray
    train_patients: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    models: dict[int, Stacker] = field(default_factory=dict)
    postprocess: Any = None


@dataclass
class FoldFit:
    """One level-2 fold of one stacker: fitted on the other folds' rows, predicting fold ``fold``'s and the test rows.

    Attributes:
        name: the stacker's name.
        fold: the held-out base fold k.
        oof: (n_k, 6) probabilities of fold k's rows, in row order (``folds == k``).
        test: (N_test, 6) mean of the model's predictions over the test feature sets.
        train_patients: the patients the model was trained on.
        seconds: wall time of the fit and the predictions.
        model: the fitted stacker (None when not kept).
    """

    name: str
    fold: int
    oof: np.ndarray
    test: np.ndarray
    train_patients: np.ndarray
    seconds: float = 0.0
    model: Stacker | None = None


def _test_sets(test: Level2Data | Sequence[Level2Data] | None) -> list[Level2Data]:
    return [] if test is None else [test] if isinstance(test, Level2Data) else list(test)


def fit_fold(
    make_stacker: Callable[[], Stacker],
    data: Level2Data,
    y: np.ndarray,
    folds: np.ndarray,
    fold: int,
    test: Level2Data | Sequence[Level2Data] | None = None,
    keep_model: bool = False,
) -> FoldFit:
    """Fit a fresh stacker on the rows of every fold but ``fold`` and predict fold ``fold`` and the test rows.

    One job of a split stack (``rsna19 stack --part fit``) runs exactly this; :func:`cross_fit` runs it for every
    fold, so both give the same numbers.

    Args:
        make_stacker: returns a new, unfitted stacker.
        data: OOF features, N rows.
        y: (N, 6) labels.
        folds: (N,) fold of each row.
        fold: the held-out fold.
        test: test features, several sets of them (one per base fold), or None.
        keep_model: keep the fitted stacker in the result.
    """
    start = time.perf_counter()
    held = folds == fold
    if not held.any():
        raise ValueError(f"fold {fold} has no level-2 rows (folds: {sorted(set(folds.tolist()))})")
    train = data.take(~held)
    stacker = make_stacker()
    stacker.fit(train, y[~held])
    oof = np.asarray(stacker.predict(data.take(held)), dtype=np.float64)
    sets = _test_sets(test)
    test_mean = np.zeros((len(sets[0]) if sets else 0, len(CLASSES)))
    for t in sets:
        test_mean += stacker.predict(t) / len(sets)
    return FoldFit(
        stacker.name,
        int(fold),
        oof,
        test_mean,
        np.unique(train.groups),
        time.perf_counter() - start,
        stacker if keep_model else None,
    )


def combine_folds(parts: Sequence[FoldFit], folds: np.ndarray) -> CrossFitResult:
    """The cross-fit result of one stacker from its per-fold fits (any order; each fold once).

    Args:
        parts: one :class:`FoldFit` per fold of ``folds``.
        folds: (N,) fold of each OOF row.

    Raises:
        ValueError: a fold missing or given twice, or parts of different stackers.
    """
    fold_ids = [int(k) for k in np.unique(folds)]
    by_fold = {p.fold: p for p in parts}
    if sorted(by_fold) != fold_ids or len(parts) != len(fold_ids):
        raise ValueError(f"level-2 folds {sorted(p.fold for p in parts)} do not match the folds {fold_ids}")
    names = {p.name for p in parts}
    if len(names) != 1:
        raise ValueError(f"fold fits of several stackers combined: {sorted(names)}")
    first = by_fold[fold_ids[0]]
    oof = np.full((len(folds), len(CLASSES)), np.nan)
    test_sum = np.zeros_like(first.test)
    result = CrossFitResult(name=first.name, oof=oof, test=test_sum)
    for k in fold_ids:
        part = by_fold[k]
        oof[folds == k] = part.oof
        test_sum += part.test
        result.train_patients[k] = part.train_patients
        result.seconds += part.seconds
        if part.model is not None:
            result.models[k] = part.model
    result.test = test_sum / len(fold_ids)
    return result


def cross_fit(
    make_stacker: Callable[[], Stacker],
    data: Level2Data,
    y: np.ndarray,
    folds: np.ndarray,
    test: Level2Data | Sequence[Level2Data] | None = None,
    keep_models: bool = False,
) -> CrossFitResult:
    """Run level-2 CV for one kind of stacker: :func:`fit_fold` for every fold, then :func:`combine_folds`.

    Args:
        make_stacker: returns a new, unfitted stacker (called once per fold).
        data: OOF features, N rows.
        y: (N, 6) labels.
        folds: (N,) fold of each row (the base models' patient-grouped folds).
        test: test features, or several sets of them (one per base fold: every fold model predicts each and the
            test prediction is the mean over fold models and sets), or None.
        keep_models: keep the fitted fold models in the result (for inspection).

    Returns:
        The level-2 OOF and test predictions.
    """
    start = time.perf_counter()
    parts = [fit_fold(make_stacker, data, y, folds, int(k), test, keep_models) for k in np.unique(folds)]
    result = combine_folds(parts, folds)
    result.seconds = time.perf_counter() - start
    return result
