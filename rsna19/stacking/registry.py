"""Stacker registry: level-2 models are plug-ins registered by name with the dataclass of their config section.

A stacker is one class decorated with :func:`register_stacker`. Its name is also the name of its section in the
stack config (``lgbm:``, ``mlp:``, ``convex:`` in ``configs/stack/*.yaml``), a field of
:class:`rsna19.stacking.config.StackConfig` whose type is the registered config dataclass; the section's
``enabled`` switch decides whether :func:`make_stackers` runs it. Importing :mod:`rsna19.stacking` registers the
built-in stackers.

Example:
    >>> @register_stacker("lgbm", config=LgbmConfig)
    ... class LgbmStacker:
    ...     def fit(self, data, y): ...
    ...     def predict(self, data): ...
    ...     def save(self, dest): ...
    ...     @classmethod
    ...     def load(cls, info, read): ...
    ...     @classmethod
    ...     def from_config(cls, cfg, seed): ...
    >>> factories = make_stackers(stack_cfg)  # {"convex": ..., "lgbm": ..., "mlp": ...} of the enabled ones
    >>> factories["lgbm"]().fit(data, y)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from rsna19.core.errors import UserError

log = logging.getLogger(__name__)

#: The methods every registered stacker class defines (see :class:`rsna19.stacking.base.RegisteredStacker`).
REQUIRED_METHODS = ("fit", "predict", "save", "load", "from_config")

C = TypeVar("C", bound=type)


@dataclass(frozen=True)
class StackerSpec:
    """One registered stacker.

    Attributes:
        name: registry key, stacker name in outputs and bundles, and the name of its stack-config section.
        cls: the stacker class (:class:`rsna19.stacking.base.RegisteredStacker`).
        config: dataclass type of its config section; it has an ``enabled: bool`` field.
        description: one line (defaults to the first line of the class docstring).
    """

    name: str
    cls: type
    config: type
    description: str


_REGISTRY: dict[str, StackerSpec] = {}


def register_stacker(name: str, config: type, description: str = "") -> Callable[[C], C]:
    """Class decorator adding a stacker to the registry under ``name``.

    Sets ``cls.name = name`` (the name :func:`rsna19.stacking.cv.cross_fit` reports). Stackers run in
    registration order.

    Args:
        name: registry key; also the stack-config section (``StackConfig.<name>``) that configures the stacker.
        config: the dataclass of that section; it must have an ``enabled: bool`` field.
        description: one line (defaults to the class docstring's first line).

    Raises:
        ValueError: a name registered twice, a config that is not a dataclass with ``enabled``, or a class
            without one of :data:`REQUIRED_METHODS`.
    """
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise ValueError(f"stacker {name!r}: config must be a dataclass type, got {config!r}")
    if "enabled" not in {f.name for f in dataclasses.fields(config)}:
        raise ValueError(f"stacker {name!r}: its config {config.__name__} needs an `enabled: bool` field")

    def wrap(cls: C) -> C:
        if name in _REGISTRY:
            raise ValueError(f"stacker {name!r} is registered twice")
        missing = [m for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
        if missing:
            raise ValueError(f"stacker {name!r} ({cls.__name__}) does not define {', '.join(missing)}")
        if getattr(cls, "name", name) != name:
            raise ValueError(f"stacker class {cls.__name__} has name {cls.name!r} but is registered as {name!r}")
        cls.name = name
        doc = description or (inspect.getdoc(cls) or "").split("\n")[0]
        _REGISTRY[name] = StackerSpec(name, cls, config, doc)
        return cls

    return wrap


def get_stacker_spec(name: str) -> StackerSpec:
    """The spec of stacker ``name``.

    Raises:
        UserError: unknown name (the message lists the registered ones).
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown stacker {name!r}; registered: {', '.join(_REGISTRY) or 'none'}")
    return _REGISTRY[name]


def list_stackers() -> list[StackerSpec]:
    """All registered stackers, in registration order (the order they run and are reported in)."""
    return list(_REGISTRY.values())


def stacker_section(cfg: Any, name: str) -> Any | None:
    """The config section of stacker ``name`` in stack config ``cfg``, or None when ``cfg`` has no such field.

    Raises:
        UserError: unknown stacker.
        TypeError: the field exists but is not the stacker's registered config dataclass.
    """
    spec = get_stacker_spec(name)
    section = getattr(cfg, name, None)
    if section is None:
        return None
    if not isinstance(section, spec.config):
        raise TypeError(
            f"{type(cfg).__name__}.{name} is a {type(section).__name__}; stacker {name!r} is registered with "
            f"config {spec.config.__name__}"
        )
    return section


def build_stacker(name: str, cfg: Any) -> Any:
    """A new, unfitted stacker ``name`` configured from its section of stack config ``cfg`` and ``cfg.seed``.

    Raises:
        UserError: unknown stacker, or a stack config without the stacker's section.
    """
    spec = get_stacker_spec(name)
    section = stacker_section(cfg, name)
    if section is None:
        raise UserError(f"the stack config ({type(cfg).__name__}) has no `{name}:` section for stacker {name!r}")
    return spec.cls.from_config(section, int(getattr(cfg, "seed", 0)))


def make_stackers(cfg: Any) -> dict[str, Callable[[], Any]]:
    """Factories of the enabled stackers, by name, in registration order.

    A registered stacker runs when its section in ``cfg`` has ``enabled: true``. A stacker whose section the
    config's schema does not have is skipped with a warning (add the field to ``StackConfig`` to use it).

    Args:
        cfg: a :class:`rsna19.stacking.config.StackConfig` (or a subclass with more sections).

    Returns:
        name → a callable returning a new, unfitted stacker (one per level-2 fold).
    """
    out: dict[str, Callable[[], Any]] = {}
    for spec in list_stackers():
        section = stacker_section(cfg, spec.name)
        if section is None:
            log.warning(
                "stacker %r is registered but %s has no `%s` field; it is not run",
                spec.name,
                type(cfg).__name__,
                spec.name,
            )
            continue
        if section.enabled:
            out[spec.name] = functools.partial(build_stacker, spec.name, cfg)
    return out
