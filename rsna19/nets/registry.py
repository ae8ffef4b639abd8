"""Model registry: families are registered by name, with their traits, and built from config arguments.

A family's traits are what code outside :mod:`rsna19.nets` needs to know about it, so that nothing there tests a
family's name: whether it reads subtype masks, where its pretrained weights come from, and whether it reads the
embeddings of another run (:class:`ModelSpec`).

Families outside the package are *plugins*: Python modules (importable names or ``.py`` files) named in
``$RSNA19_PLUGINS`` (comma-separated). They are imported, once each, on the first look-up that follows, and register
their families (and tasks, ``rsna19.engine.tasks.register_task``) as the built-in modules do. Bundles record the
plugin a model came from but never import it: the user names it.

Example:
    >>> @register_model("clf2d", description="one slice, windows as channels")
    ... def clf2d(backbone: str = "resnet18", **kw) -> nn.Module: ...
    >>> model = build_model("clf2d", backbone="resnet34", n_windows=3)
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rsna19.core.errors import UserError

#: The environment variable naming plugin modules (comma-separated importable names or ``.py`` files).
PLUGINS_ENV = "RSNA19_PLUGINS"

#: Where a family's pretrained weights come from (``pretrained=`` of :func:`register_model`): ``"timm"``, the
#: backbone is a timm model name; ``"smp"``, an smp encoder name, with timm weights for ``tu-<timm name>`` only;
#: ``None``, the family has none (``model.pretrained`` must stay false).
PRETRAINED_SOURCES: tuple[str | None, ...] = ("timm", "smp", None)


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its builder, family, description and traits.

    Attributes:
        name: the registry key (``model.name``).
        family: groups registered names (``rsna19 models``, ``models.csv``, the bundle manifest).
        description: one line for ``rsna19 models``.
        builder: builds the network from the config's arguments.
        input_layout: ``"channels"``: (B, S·C, H, W); ``"stack"``: (B, S, C, H, W); ``"slab"``: (B, S, C, H, W) → a
            prediction per slice; ``"sequence"``: embeddings (B, T, D) + lengths (B,).
        task: the :mod:`rsna19.engine.tasks` task that feeds, trains and reads out the family.
        masks: the family learns from subtype masks (``data.masks``; a pipeline hands it ``DATA/masks/``).
        pretrained: where its pretrained weights come from (:data:`PRETRAINED_SOURCES`).
        plugin: the ``$RSNA19_PLUGINS`` entry that registered it; None for a family of the package.
    """

    name: str
    family: str
    description: str
    builder: Callable[..., nn.Module]
    input_layout: str
    task: str
    masks: bool = False
    pretrained: str | None = "timm"
    plugin: str | None = None

    @property
    def reads_embeddings(self) -> bool:
        """The family reads the per-slice embeddings of another run (``data.embeddings``), not images."""
        return self.input_layout == "sequence"


_REGISTRY: dict[str, ModelSpec] = {}
#: Plugin entries imported so far → None, or why the import failed; the entry being imported (its families record it).
_PLUGINS: dict[str, str | None] = {}
_LOADING: list[str] = []

#: The task of a family that names none: the one of its input layout.
DEFAULT_TASKS: dict[str, str] = {"channels": "slice", "stack": "slice", "slab": "slab", "sequence": "sequence"}


def register_model(
    name: str,
    family: str | None = None,
    description: str = "",
    input_layout: str = "channels",
    task: str | None = None,
    masks: bool = False,
    pretrained: str | None = "timm",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model builder to the registry under ``name``.

    Args:
        name: registry key used in configs (``model.name``).
        family: family shown by ``rsna19 models`` (defaults to ``name``).
        description: one line for ``rsna19 models`` (defaults to the builder's first docstring line).
        input_layout: the dataset layout the model expects: ``"channels"``, ``"stack"``, ``"slab"`` or
            ``"sequence"`` (``data.layout`` of its configs; ``"sequence"`` reads another run's embeddings).
        task: the :mod:`rsna19.engine.tasks` task of the family (default: the one of ``input_layout``, see
            :data:`DEFAULT_TASKS`); a family with its own loss or heads registers its own task there.
        masks: the family learns from subtype masks (its task reads ``data.masks``).
        pretrained: where its pretrained weights come from: ``"timm"``, ``"smp"`` or None (:data:`PRETRAINED_SOURCES`).
    """
    if input_layout not in DEFAULT_TASKS:
        raise ValueError(f"model {name!r}: unknown input layout {input_layout!r}; known: {', '.join(DEFAULT_TASKS)}")
    if pretrained not in PRETRAINED_SOURCES:
        raise ValueError(f"model {name!r}: unknown pretrained source {pretrained!r}; known: {PRETRAINED_SOURCES}")

    task_ = task or DEFAULT_TASKS[input_layout]

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        plugin = _LOADING[-1] if _LOADING else None
        _REGISTRY[name] = ModelSpec(name, family or name, doc, fn, input_layout, task_, masks, pretrained, plugin)
        return fn

    return wrap


def plugin_entries() -> list[str]:
    """The plugin entries of ``$RSNA19_PLUGINS``: importable module names or ``.py`` files, in order."""
    return [e.strip() for e in os.environ.get(PLUGINS_ENV, "").split(",") if e.strip()]


def _import_plugin(entry: str) -> None:
    """Import one plugin: a ``.py`` file (as module ``rsna19_plugin_<stem>``) or an importable module name."""
    if not entry.endswith(".py"):
        importlib.import_module(entry)
        return
    path = Path(entry).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    module_name = f"rsna19_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before running it: dataclasses and pickling look the module up
    spec.loader.exec_module(module)


def load_plugins() -> None:
    """Import the ``$RSNA19_PLUGINS`` entries not imported yet (their modules register families and tasks).

    Raises:
        UserError: a plugin that does not import, now or on an earlier call (the message names it and the reason).
    """
    for entry in plugin_entries():
        if entry not in _PLUGINS:
            _PLUGINS[entry] = None
            _LOADING.append(entry)
            try:
                _import_plugin(entry)
            except Exception as exc:  # any error of foreign code: reported as the plugin's, on every look-up
                _PLUGINS[entry] = f"{type(exc).__name__}: {exc}"
            finally:
                _LOADING.pop()
        if _PLUGINS[entry] is not None:
            raise UserError(f"plugin {entry!r} (${PLUGINS_ENV}) failed to import: {_PLUGINS[entry]}")


def get_model_spec(name: str) -> ModelSpec:
    """The spec of ``name``.

    Raises:
        UserError: unknown name (the message lists the known ones).
    """
    load_plugins()
    if name not in _REGISTRY:
        raise UserError(
            f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))} (a family outside rsna19 is a plugin: "
            f"name its module or .py file in ${PLUGINS_ENV})"
        )
    return _REGISTRY[name]


def list_models() -> list[ModelSpec]:
    """All registered models (plugins included), sorted by name."""
    load_plugins()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build registered model ``name`` with keyword arguments (from the config).

    Raises:
        UserError: unknown model, an argument its builder does not take, or ``pretrained`` for a family without
            pretrained weights.
    """
    spec = get_model_spec(name)
    if spec.pretrained is None and kwargs.get("pretrained"):
        raise UserError(f"model {name!r} has no pretrained weights: set model.pretrained: false")
    params = inspect.signature(spec.builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise UserError(f"model {name!r} does not take argument(s) {', '.join(unknown)}; takes {', '.join(params)}")
    return spec.builder(**kwargs)
