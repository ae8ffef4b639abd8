"""Model registry: families are registered by name and built from config arguments.

Example:
    >>> @register_model("clf2d", description="one slice, windows as channels")
    ... def clf2d(backbone: str = "resnet18", **kw) -> nn.Module: ...
    >>> model = build_model("clf2d", backbone="resnet34", n_windows=3)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from rsna19.errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its builder, family and a one-line description."""

    name: str
    family: str
    description: str
    builder: Callable[..., nn.Module]
    # "channels": (B, S·C, H, W); "stack": (B, S, C, H, W); "slab": (B, S, C, H, W) → a prediction per slice;
    # "sequence": embeddings (B, T, D) + lengths (B,).
    input_layout: str
    # The rsna19.engine.tasks task that feeds, trains and reads out the family (its data, loss and heads).
    task: str


_REGISTRY: dict[str, ModelSpec] = {}

#: The task of a family that names none: the one of its input layout.
DEFAULT_TASKS: dict[str, str] = {"channels": "slice", "stack": "slice", "slab": "slab", "sequence": "sequence"}


def register_model(
    name: str,
    family: str | None = None,
    description: str = "",
    input_layout: str = "channels",
    task: str | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model builder to the registry under ``name``.

    Args:
        name: registry key used in configs (``model.name``).
        family: family shown by ``rsna19 models`` (defaults to ``name``).
        description: one line for ``rsna19 models`` (defaults to the builder's first docstring line).
        input_layout: the dataset layout the model expects: ``"channels"``, ``"stack"``, ``"slab"`` or
            ``"sequence"`` (``data.layout`` of its configs).
        task: the :mod:`rsna19.engine.tasks` task of the family (default: the one of ``input_layout``, see
            :data:`DEFAULT_TASKS`); a family with its own loss or heads registers its own task there.
    """
    if input_layout not in DEFAULT_TASKS:
        raise ValueError(f"model {name!r}: unknown input layout {input_layout!r}; known: {', '.join(DEFAULT_TASKS)}")

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        _REGISTRY[name] = ModelSpec(name, family or name, doc, fn, input_layout, task or DEFAULT_TASKS[input_layout])
        return fn

    return wrap


def get_model_spec(name: str) -> ModelSpec:
    """The spec of ``name``.

    Raises:
        UserError: unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_models() -> list[ModelSpec]:
    """All registered models, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build registered model ``name`` with keyword arguments (from the config).

    Raises:
        UserError: unknown model or an argument its builder does not take.
    """
    spec = get_model_spec(name)
    params = inspect.signature(spec.builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise UserError(f"model {name!r} does not take argument(s) {', '.join(unknown)}; takes {', '.join(params)}")
    return spec.builder(**kwargs)
