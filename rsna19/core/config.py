"""Typed configs: dataclasses give the schema, YAML gives the values, ``a.b=value`` overrides and flags win.

The one loader of every config (pipeline, training, stack, serve). Unknown keys are errors (a typo must not
silently train the wrong model) and the resolved config is saved with every run. A key may be written with dashes
(``ae-title``) for a field with underscores; a schema may name aliases in a ``config_aliases`` class variable
(alias → field: an alias of a list field adds its values to the list); a single value stands for a one-item list.
Adding a setting is adding a typed field to the dataclass.

Example:
    >>> cfg = load_config(TrainConfig, "configs/demo_2d.yaml", ["optim.lr=3e-4"])
    >>> save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rsna19.core.atomic import write_text
from rsna19.core.errors import ConfigError

T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, checking keys and coercing scalar types.

    Args:
        cls: a dataclass type; nested dataclass fields are built recursively.
        data: the values; missing keys take the dataclass defaults.
        where: dotted prefix used in error messages.

    Raises:
        ConfigError: for an unknown key, a missing required key or a value of the wrong type.
    """
    data = canonical_keys(cls, data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)} for {cls.__name__}; "
            f"known: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}{name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}{' at ' + where.rstrip('.') if where else ''}: {exc}") from exc


def canonical_keys(cls: type, data: dict[str, Any] | None) -> dict[str, Any]:
    """The keys of one level of ``data`` as the field names of dataclass ``cls``: dashes become underscores where
    that names a field, and the aliases in ``cls.config_aliases`` are folded into their fields.

    Raises:
        ConfigError: an alias and its scalar field both given.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in (data or {}).items():
        snake = str(key).replace("-", "_")
        out[snake if snake in names else key] = value
    for alias, target in getattr(cls, "config_aliases", {}).items():
        if alias not in out:
            continue
        value = out.pop(alias)
        if typing.get_origin(typing.get_type_hints(cls)[target]) is list:
            out[target] = [*_as_list(out.get(target, [])), *_as_list(value)]
        elif target in out:
            raise ConfigError(f"{alias} and {target} are the same setting: give one")
        else:
            out[target] = value
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where + ".")
    if origin is list and isinstance(value, str | int | float):
        value = [value]  # a single value: a one-item list
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {k: _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from exc
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict; values are parsed as YAML scalars.

    Raises:
        ConfigError: for an override without ``=``.
    """
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping; a clear error names the file if it is missing or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_config(
    cls: type[T],
    path: str | os.PathLike[str] | None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: Mapping[str, Any] | None = None,
) -> T:
    """Load dataclass ``cls``: its defaults, then the YAML file ``path``, then dotted overrides, then flags.

    A top-level ``name`` key, when the schema has one and the file omits it, defaults to the file stem.

    Args:
        cls: the config dataclass.
        path: a YAML mapping (None: defaults only).
        overrides: ``a.b=value`` strings, values parsed as YAML scalars.
        flags: top-level values already typed (command-line flags); a None value is not given.

    Raises:
        ConfigError: naming the file and the key for a missing or unreadable file, an unknown key or a value of the
            wrong type.
    """
    data = read_yaml(path) if path is not None else {}
    names = {f.name for f in dataclasses.fields(cls)}
    if path is not None and "name" in names and "name" not in data:
        data["name"] = Path(path).stem
    where = f"{path}: " if path is not None else f"{cls.__name__}: "
    try:
        data = apply_overrides(canonical_keys(cls, data), list(overrides))
        data |= {k: v for k, v in (flags or {}).items() if v is not None}
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass config (tuples become lists, for YAML)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def save_config(cfg: Any, path: str | os.PathLike[str]) -> Path:
    """Write the resolved config as YAML, atomically."""
    return write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), path)
