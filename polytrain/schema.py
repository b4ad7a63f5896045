"""Dataclass trees from plain nested dicts (parsed YAML), and back: every key, type and domain checked.

``from_dict(cls, tree)`` builds the frozen dataclass ``cls`` from a mapping,
refusing unknown keys (with a did-you-mean), missing required ones and values
of the wrong type or outside their domain, then runs each section's own
``check()``.  Every error is a ``ConfigError`` naming the dotted key, the value
and what is allowed.  This module knows no section: the root config
(``polytrain.config``) and plugins with config classes of their own both use it.

Domains hold for every field of a type, without a word in the section:
floats are finite, integers fit in 64 bits (what torch and the operating
system take), strings hold no NUL character (no path or argument can).  A
field narrows its type with a ``Range`` in ``typing.Annotated``
(``steps: Positive[int] = 1000``, ``dropout: Fraction = 0.0``); ``check()``
methods keep what relates several fields.
"""

import dataclasses
import difflib
import math
import types
import typing
from typing import Annotated, Any, Iterator, Literal

from polytrain.errors import ConfigError

INT64 = (-2**63, 2**63 - 1)
"""The integers a config may hold at all: what torch's tensors, seeds and the OS's sizes take."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a field allows, declared on its type: ``Annotated[int, Range(ge=1, unit="second")]``.

    ``ge``/``gt`` and ``le``/``lt`` are inclusive/exclusive bounds; ``noun``, ``unit`` and ``note`` only
    shape the message (``must be a TCP port in 1..65535``, ``must be >= 1 second``, ``must be >= 0 (0: all)``).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    noun: str = ""
    unit: str = ""
    note: str = ""

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def check(self, key: str, value: float) -> None:
        if value not in self:
            raise ConfigError(key, value, self.describe(integers=isinstance(value, int)))

    def describe(self, integers: bool = False) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            closed = self.ge is not None and self.le is not None
            bounds = f"in {self.ge}..{self.le}" if integers and closed else f"in {low}, {high}"
        elif low:
            bounds = f">= {self.ge}" if self.ge is not None else f"> {self.gt}"
        else:
            bounds = f"<= {self.le}" if self.le is not None else f"< {self.lt}"
        text = " ".join(part for part in ("must be", self.noun, bounds, self.unit) if part)
        return f"{text} ({self.note})" if self.note else text


T = typing.TypeVar("T", int, float)
Positive = Annotated[T, Range(gt=0)]
"""``Positive[int]``, ``Positive[float]``: > 0."""
NonNegative = Annotated[T, Range(ge=0)]
"""``NonNegative[int]``, ``NonNegative[float]``: >= 0."""
Fraction = Annotated[float, Range(ge=0, lt=1)]
"""A share that cannot be all: a dropout rate, label smoothing, [0, 1)."""
Probability = Annotated[float, Range(ge=0, le=1)]
"""[0, 1]."""


def to_dict(cfg: Any) -> dict:
    """The plain nested-dict form of a config, as written to ``RUN_DIR/config.yaml``."""
    return dataclasses.asdict(cfg)


def changed_numbers(cfg: Any, key: str = "") -> Iterator[tuple[str, float, Any]]:
    """Every number of the config tree ``cfg`` that differs from its field's default, as (dotted key, value, the
    tree with that one value back at its default); for finding which value makes a config too large."""
    for f in dataclasses.fields(cfg):
        value, sub = getattr(cfg, f.name), _join(key, f.name)
        if dataclasses.is_dataclass(value):
            for name, number, reset in changed_numbers(value, sub):
                yield name, number, dataclasses.replace(cfg, **{f.name: reset})
        elif isinstance(value, dict):
            for item, part in value.items():
                if dataclasses.is_dataclass(part):
                    for name, number, reset in changed_numbers(part, f"{sub}.{item}"):
                        yield name, number, dataclasses.replace(cfg, **{f.name: {**value, item: reset}})
        elif (isinstance(value, (int, float)) and not isinstance(value, bool) and f.default is not dataclasses.MISSING
              and value != f.default):
            yield sub, value, dataclasses.replace(cfg, **{f.name: f.default})


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, checking keys and types; errors name the dotted ``key``."""
    if not isinstance(data, dict):
        raise ConfigError(key or "config", data, f"must be a mapping with keys {_field_names(cls)}")
    hints = typing.get_type_hints(cls, include_extras=True)
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
    if origin is Annotated:
        value = _convert(args[0], value, key)
        for rule in args[1:]:
            rule.check(key, value)
        return value
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
        if not INT64[0] <= value <= INT64[1]:
            raise ConfigError(key, value, "must be an integer that fits in 64 bits (-2**63 .. 2**63-1)")
        return value
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(key, value, "must be a number")
        if not math.isfinite(number):
            raise ConfigError(key, value, "must be a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        if "\0" in value:
            raise ConfigError(key, value, "must not contain a NUL character (no path or argument can)")
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported by the loader")


def _number(value: Any) -> float | None:
    """``value`` as a float, or None if it is no number.  YAML reads 1e-3 (no dot) as a string, so any
    numeric literal is taken; an integer too large for a float is infinite."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))
