"""Dataclass trees from plain nested dicts (parsed YAML), and back: every key and type checked.

``from_dict(cls, tree)`` builds the frozen dataclass ``cls`` from a mapping,
refusing unknown keys (with a did-you-mean), missing required ones and values
of the wrong type, then runs each section's own ``check()``.  Every error is a
``ConfigError`` naming the dotted key, the value and what is allowed.  This
module knows no section: the root config (``polytrain.config``) and plugins
with config classes of their own both use it.
"""

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

import yaml

from polytrain.errors import ConfigError


def to_dict(cfg: Any) -> dict:
    """The plain nested-dict form of a config, as written to ``RUN_DIR/config.yaml``."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types; errors name the dotted ``key``."""
    if not isinstance(data, dict):
        raise ConfigError(key or "config", data, f"must be a mapping with keys {_field_names(cls)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
        hint = f"; did you mean {_join(key, close[0])!r}?" if close else ""
        raise ConfigError(_join(key, unknown[0]), data[unknown[0]], f"unknown key; known keys: {_field_names(cls)}{hint}")
    values = {}
    for name, f in fields.items():
        sub = _join(key, name)
        if name in data:
            values[name] = _convert(hints[name], data[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(sub, None, "is required")
    obj = cls(**values)
    if hasattr(obj, "check"):
        try:
            obj.check()
        except ConfigError as err:
            raise err.under(key) from None
    return obj


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, value, f"must be one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(option, value, key)
            except ConfigError as err:
                errors.append(err.allowed)
        raise ConfigError(key, value, " or ".join(errors))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, value, "must be a list")
        return [_convert(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(key, value, f"must be a list of {len(args)} values")
        return tuple(_convert(a, v, f"{key}.{i}") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, "must be a mapping")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    return _convert_scalar(tp, value, key)


def _convert_scalar(tp: type, value: Any, key: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if tp is float:
        # YAML reads 1e-3 (no dot) as a string; accept any numeric literal.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported by the loader")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))
