"""The typed config tree: a YAML recipe plus dotted ``key=value`` overrides, validated.

Each component owns a small frozen dataclass next to the class it builds; the
root ``Config`` nests them.  Loading checks every key and type against those
dataclasses, runs each section's own ``check()``, then the checks that span
sections (``Config.check``).  Every error names the dotted key, the value and
what is allowed.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from polytrain.errors import ConfigError
from polytrain.launch.config import LaunchConfig
from polytrain.models.heads import HEADS
from polytrain.models.model import ModelConfig
from polytrain.platform.data import DataConfig
from polytrain.platform.engine import EngineConfig
from polytrain.platform.finetune import FinetuneConfig
from polytrain.platform.tracking import TrackingConfig
from polytrain.platform.trainer import TrainConfig
from polytrain.registry import import_plugins
from polytrain.tokenizers import TokenizersConfig

_MISSING = object()


@dataclass(frozen=True)
class Config:
    """The whole run: one section per component."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizers: TokenizersConfig = field(default_factory=TokenizersConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    plugins: list[str] = field(default_factory=list)
    """Python modules imported before the config is checked, so that their registry calls (a tokenizer,
    an embedder, a head of their own) exist; installed packages with entry points need no entry here."""

    def check(self) -> None:
        """Checks that need more than one section."""
        max_len = self.tokenizers.text.max_len
        for name, task in self.data.tasks.items():
            key = f"data.tasks.{name}"
            if not HEADS.get(task.head).needs_encoder:
                if task.seq_len > max_len:
                    raise ConfigError(f"{key}.seq_len", task.seq_len, f"must be <= tokenizers.text.max_len={max_len}")
                continue
            if self.model.backbone.encoder_layers == 0:
                raise ConfigError(f"{key}.head", task.head, "needs an encoder, but model.backbone.encoder_layers=0; "
                                  "set model.backbone.encoder_layers > 0 or use head=decoder_only")
            if task.max_target_len + 2 > max_len:  # bos ... eos
                raise ConfigError(f"{key}.max_target_len", task.max_target_len,
                                  f"+2 (bos, eos) must be <= tokenizers.text.max_len={max_len}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read the YAML recipe at ``path`` (or start empty), apply ``key=value`` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", str(path), "no such file")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError("config", str(path), f"is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError("config", str(path), "must hold a mapping of sections at the top level")
    for item in overrides:
        apply_override(tree, item)
    import_plugins(tree.get("plugins", []))
    return from_dict(Config, tree)


def apply_override(tree: dict, item: str) -> None:
    """Set ``a.b.c=value`` in the nested dict ``tree``; the value is parsed as YAML (``3``, ``true``, ``[a, b]``)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError("override", item, "must look like section.key=value")
    *parents, leaf = key.split(".")
    node = tree
    for depth, part in enumerate(parents):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(parents[: depth + 1]), child, f"is a value, not a section; cannot set {key}")
        node = child
    node[leaf] = yaml.safe_load(raw) if raw.strip() else ""


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
