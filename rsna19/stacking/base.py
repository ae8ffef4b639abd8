"""What every level-2 model implements, and the patient-grouped inner split used for early stopping."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from rsna19.stacking.features import Level2Data


class Stacker(Protocol):
    """A level-2 model: fit on the features of some patients, predict the six probabilities of others."""

    name: str

    def fit(self, data: Level2Data, y: np.ndarray) -> None:
        """Fit on ``data`` (N rows) with labels ``y`` (N, 6)."""

    def predict(self, data: Level2Data) -> np.ndarray:
        """Return (N, 6) probabilities in CLASSES order."""


def inner_split(groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into train / validation by patient, for early stopping inside a level-2 training fold.

    Args:
        groups: (N,) patient id of each row.
        fraction: share of the patients that go to validation (at least one, and at least one stays).
        seed: the split is a deterministic function of the seed and the set of patients.

    Returns:
        Index arrays (train, val) of rows.
    """
    patients = np.unique(groups)
    if len(patients) < 2:
        raise ValueError("an inner validation split needs at least two patients")
    rng = np.random.default_rng(seed)
    n_val = int(np.clip(round(fraction * len(patients)), 1, len(patients) - 1))
    val_patients = rng.permutation(patients)[:n_val]
    is_val = np.isin(groups, val_patients)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)
