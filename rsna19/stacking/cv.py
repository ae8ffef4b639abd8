"""Level-2 cross-validation on the base models' patient-grouped folds.

For each fold k, a fresh stacker is fitted on the OOF features of the other folds and predicts fold k, so every
level-2 OOF prediction comes from a model that never saw its patient; the test prediction is the mean of the
fold models' predictions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from rsna19.constants import CLASSES
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
        seconds: wall time of the whole CV (fit and predict).
        models: fold k → the fitted stacker.
    """

    name: str
    oof: np.ndarray
    test: np.ndarray
    train_patients: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    models: dict[int, Stacker] = field(default_factory=dict)


def cross_fit(
    make_stacker: Callable[[], Stacker],
    data: Level2Data,
    y: np.ndarray,
    folds: np.ndarray,
    test: Level2Data | Sequence[Level2Data] | None = None,
    keep_models: bool = False,
) -> CrossFitResult:
    """Run level-2 CV for one kind of stacker.

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
    oof = np.full((len(data), len(CLASSES)), np.nan)
    test_sets = [] if test is None else [test] if isinstance(test, Level2Data) else list(test)
    test_sum = np.zeros((len(test_sets[0]) if test_sets else 0, len(CLASSES)))
    fold_ids = np.unique(folds)
    result = CrossFitResult(name="", oof=oof, test=test_sum)
    for k in fold_ids:
        held = folds == k
        train = data.take(~held)
        stacker = make_stacker()
        stacker.fit(train, y[~held])
        oof[held] = stacker.predict(data.take(held))
        for t in test_sets:
            test_sum += stacker.predict(t) / len(test_sets)
        result.name = stacker.name
        result.train_patients[int(k)] = np.unique(train.groups)
        if keep_models:
            result.models[int(k)] = stacker
    result.test = test_sum / len(fold_ids)
    result.seconds = time.perf_counter() - start
    return result
