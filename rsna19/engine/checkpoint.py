"""Checkpoints as plain dicts of tensors and builtins.

They are written with :func:`torch.save` under a temporary name and renamed (a killed run never leaves a
half-written ``last.pt``), and read with ``torch.load(weights_only=True)``: no pickled objects, so a checkpoint
from elsewhere cannot run code. The resolved config travels as a plain nested dict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rsna19.core.atomic import atomic_path
from rsna19.core.errors import UserError

#: Bumped when the layout of the dict changes.
CHECKPOINT_VERSION = 1


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``state`` (plain dicts, lists, numbers, strings, tensors) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        UserError: missing, unreadable or of another layout version.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for corrupt files
        raise UserError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path}: not an rsna19 checkpoint of version {CHECKPOINT_VERSION}")
    return state


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel (or the model itself)."""
    return model.module if hasattr(model, "module") else model
