"""The typed config tree: a YAML recipe plus dotted ``key=value`` overrides, validated.

Each component owns a small frozen dataclass in its package's ``config.py``
(torch-free, like this module: reading and checking a recipe, on a login node
say, imports none of the training stack); the root ``Config`` nests them.
Loading checks every key and type against those dataclasses (``schema``), runs
each section's own ``check()``, then the checks that span sections
(``Config.check``).  Every error names the dotted key, the value and what is
allowed.  Checks that need the machine a job runs on (CUDA, files, fp16
support) run where the job starts (``platform.train.machine``).
"""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from polytrain.errors import ConfigError
from polytrain.launch.backends import BACKENDS
from polytrain.launch.config import LaunchConfig
from polytrain.models.config import ModelConfig, head_kind
from polytrain.models.preset_configs import MODEL_PRESETS
from polytrain.models.tower_config import check_towers_data
from polytrain.platform.data.config import DataConfig
from polytrain.platform.distributed.config import EngineConfig
from polytrain.platform.observe.config import TrackingConfig
from polytrain.platform.train.config import FinetuneConfig, TrainConfig
from polytrain.registry import import_plugins
from polytrain.schema import from_dict, to_dict
from polytrain.tokenizers.config import TokenizersConfig


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
        """Checks that need more than one section, or a registry beyond the section's own."""
        if self.launch.backend not in BACKENDS:
            raise ConfigError("launch.backend", self.launch.backend,
                              f"unknown launcher; known: {', '.join(BACKENDS.names())}")
        try:
            BACKENDS.get(self.launch.backend).check(self.launch)
        except ConfigError as err:
            raise err.under("launch") from None
        max_len = self.tokenizers.text.max_len
        for name, task in self.data.tasks.items():
            key = f"data.tasks.{name}"
            if not head_kind(task.head).encoder:
                if task.seq_len > max_len:
                    raise ConfigError(f"{key}.seq_len", task.seq_len, f"must be <= tokenizers.text.max_len={max_len}")
                continue
            towers = task.modalities and all(m in self.model.towers for m in task.modalities)  # a tower encodes
            if self.model.backbone.encoder_layers == 0 and not towers:
                raise ConfigError(f"{key}.head", task.head, "needs an encoder, but model.backbone.encoder_layers=0; "
                                  "set model.backbone.encoder_layers > 0, give its inputs towers (model.towers) or "
                                  "use head=decoder_only")
            if task.max_target_len + 2 > max_len:  # bos ... eos
                raise ConfigError(f"{key}.max_target_len", task.max_target_len,
                                  f"+2 (bos, eos) must be <= tokenizers.text.max_len={max_len}")
        self.check_init_parts()
        spans = {name: task.modalities for name, task in self.data.tasks.items()
                 if head_kind(task.head).layout == "causal"}
        check_towers_data(self.model.towers, self.tokenizers, spans)

    def check_init_parts(self) -> None:
        """Every ``heads.<task>`` and ``embedders.<modality>`` part names a task and a modality of this run."""
        modalities = ("text", *self.data.modalities)
        for name, source in self.finetune.init_parts.items():
            for index, part in enumerate(source.parts):
                kind, _, which = part.partition(".")
                known = {"heads": self.data.tasks, "embedders": modalities}.get(kind)
                if known is not None and which not in known:
                    raise ConfigError(f"finetune.init_parts.{name}.parts.{index}", part,
                                      f"this run has no such {'task' if kind == 'heads' else 'modality'}; it has "
                                      f"{', '.join(known)}")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read the YAML recipe at ``path`` (or start empty), apply ``key=value`` overrides, validate."""
    return build_config(load_tree(path, overrides))


def load_tree(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """The recipe at ``path`` (or an empty one) with the overrides applied, parsed but not yet validated."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", str(path), "no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ConfigError("config", str(path), f"is not UTF-8 text (byte {err.start}: {err.reason})") from None
        tree = parse_yaml(text, str(path))
    for item in overrides:
        apply_override(tree, item)
    return tree


def config_from_yaml(text: str, where: str) -> Config:
    """The config a run saved (``config.yaml``, an export's metadata); ``where`` names it in errors."""
    return build_config(parse_yaml(text, where))


def parse_yaml(text: str, where: str) -> dict:
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError("config", where, f"is not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError("config", where, "must hold a mapping of sections at the top level")
    return tree


def build_config(tree: dict) -> Config:
    """The validated config of a parsed recipe; the plugins it lists are imported first."""
    import_plugins(tree.get("plugins", []))
    return from_dict(Config, with_preset(tree))


def with_preset(tree: dict) -> dict:
    """``tree`` with ``model.preset`` replaced by that preset's model section, under the recipe's own model keys."""
    model = tree.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        return tree
    name = model["preset"]
    if name not in MODEL_PRESETS:
        raise ConfigError("model.preset", name, f"unknown model preset; known: {', '.join(MODEL_PRESETS.names())}")
    own = {key: value for key, value in model.items() if key != "preset"}
    return {**tree, "model": merged(to_dict(MODEL_PRESETS.get(name)), own)}


def merged(base: dict, over: dict) -> dict:
    """``base`` with the keys of ``over`` put in, mappings merged key by key at every depth."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


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
