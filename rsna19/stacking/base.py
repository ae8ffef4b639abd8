"""What every level-2 model implements, file helpers for saving one, and the patient-grouped inner split."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from rsna19.core.errors import UserError
from rsna19.stacking.features import Level2Data

if TYPE_CHECKING:
    import torch
    from typing_extensions import Self

#: Reads a file of a saved stacker by its name relative to the stacker folder (after the bundle's checks).
Reader = Callable[[str], bytes]


class Stacker(Protocol):
    """A level-2 model: fit on the features of some patients, predict the six probabilities of others."""

    name: str

    def fit(self, data: Level2Data, y: np.ndarray) -> None:
        """Fit on ``data`` (N rows) with labels ``y`` (N, 6)."""

    def predict(self, data: Level2Data) -> np.ndarray:
        """Return (N, 6) probabilities in CLASSES order."""


class RegisteredStacker(Stacker, Protocol):
    """A stacker plug-in (:func:`rsna19.stacking.registry.register_stacker`): built from its config section,
    saved into and loaded from an inference bundle by its own methods.

    Saved files are JSON, LightGBM text dumps or safetensors, never a pickle; the bundle refuses anything else.
    """

    @classmethod
    def from_config(cls, cfg: Any, seed: int) -> Self:
        """A new, unfitted stacker from its config section ``cfg`` and the stack config's seed."""

    def save(self, dest: Path) -> dict[str, Any]:
        """Write the fitted stacker's files into folder ``dest`` (shared by all stackers of a bundle: prefix the
        file names with the stacker's name) and return the JSON-able info :meth:`load` needs (file names
        included)."""

    @classmethod
    def load(cls, info: dict[str, Any], read: Reader) -> Self:
        """The fitted stacker from ``info`` (what :meth:`save` returned) and its files, read through ``read``.

        Raises:
            UserError: a file that is missing, changed, or does not parse.
        """


def save_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as JSON (no NaN or infinity) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n", encoding="utf-8")


def read_json(read: Reader, name: str) -> Any:
    """Parse file ``name`` of a saved stacker as JSON.

    Raises:
        UserError: the file is not valid JSON.
    """
    try:
        return json.loads(read(name))
    except ValueError as exc:
        raise UserError(f"stacker file {name}: not valid JSON: {exc}") from None


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a dict of tensors as a safetensors file."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def read_tensors(read: Reader, name: str) -> dict[str, torch.Tensor]:
    """Load file ``name`` of a saved stacker as safetensors (CPU tensors).

    Raises:
        UserError: the file is not a safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(read(name))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UserError(f"stacker file {name}: not a safetensors file: {exc}") from None


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
