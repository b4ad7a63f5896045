"""The typed config tree: a YAML recipe plus dotted ``key=value`` overrides, validated.

Each component owns a small frozen dataclass, one module of this package per
section (torch-free, like the whole package: reading and checking a recipe, on
a login node say, imports none of the training stack, and nothing here imports
a module above the config); the root ``Config`` nests them.  Loading checks
every key and type against those dataclasses (``schema``), runs each section's
own ``check()``, then the checks that span sections (``Config.check``).  Every
error names the dotted key, the value and what is allowed.  What the
checkpoints a recipe starts from give, and the batch arithmetic over the job's
processes, are the job's (``polytrain.job``); checks that need the machine a
job runs on (CUDA, files, fp16 support, memory) run where the job starts
(``platform/train/preflight.py``).
"""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from polytrain.config.data import DataConfig
from polytrain.config.engine import EngineConfig
from polytrain.config.launch import LaunchConfig
from polytrain.config.model import ModelConfig, head_kind
from polytrain.config.registries import BACKENDS, PRESETS
from polytrain.config.tokenizers import TokenizersConfig
from polytrain.config.tower import check_towers_data
from polytrain.config.tracking import TrackingConfig
from polytrain.config.train import FinetuneConfig, TrainConfig
from polytrain.errors import ConfigError
from polytrain.registry import import_plugins
from polytrain.schema import from_dict, to_dict


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
        for name, task in self.data.tasks.items():
            self.check_task(f"data.tasks.{name}", task)
        self.check_init_parts()
        self.check_sequence_parallel(self.engine.sequence_parallel)
        if self.model.towers:
            spans = {name: task.modalities for name, task in self.data.tasks.items()
                     if head_kind(task.head).text_spans}
            check_towers_data(self.model.towers, self.tokenizers, spans)

    def check_task(self, key: str, task) -> None:
        """The task's head finds the stacks it runs, and its text fits the text positions."""
        kind, backbone, max_len = head_kind(task.head), self.model.backbone, self.tokenizers.text.max_len
        towers = bool(task.modalities) and all(m in self.model.towers for m in task.modalities)  # a tower encodes
        for stack, needed in (("encoder", kind.encoder and not towers), ("decoder", kind.decoder)):
            if needed and not getattr(backbone, f"{stack}_layers"):
                other = "give its inputs towers (model.towers) or use head=decoder_only" if stack == "encoder" \
                    else "use an encoder head"
                raise ConfigError(f"{key}.head", task.head, f"needs {'an' if stack == 'encoder' else 'a'} {stack}, "
                                  f"but model.backbone.{stack}_layers=0; set model.backbone.{stack}_layers > 0 or "
                                  f"{other}")
        if backbone.encoder and kind.encoder and not kind.sources:
            raise ConfigError("model.backbone.encoder", backbone.encoder, f"{key} uses head {task.head}, whose text "
                              "the encoder would read; with blocks of its own the encoder reads image or audio inputs "
                              "only")
        if not kind.encoder and task.seq_len > max_len:
            raise ConfigError(f"{key}.seq_len", task.seq_len, f"must be <= tokenizers.text.max_len={max_len}")
        if kind.encoder and task.max_target_len + 2 > max_len:  # bos ... eos
            raise ConfigError(f"{key}.max_target_len", task.max_target_len,
                              f"+2 (bos, eos) must be <= tokenizers.text.max_len={max_len}")

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

    def check_sequence_parallel(self, size: int) -> None:
        """engine.sequence_parallel=``size`` against the model: each of the ``size`` processes sharing a sample
        attends with a slice of every stack's heads (the processes it must divide are the job's to check)."""
        if size == 1:
            return
        key, backbone = "engine.sequence_parallel", self.model.backbone
        stacks = [("model.backbone", backbone)] * bool(backbone.decoder_layers)
        if backbone.encoder_layers:
            stacks.append(("model.backbone.encoder" if backbone.encoder else "model.backbone", backbone.encoder_stack))
        for where, stack in stacks:
            for name, heads in (("n_heads", stack.n_heads), ("kv_heads", stack.kv_heads)):
                if heads % size:
                    noun = "key/value heads (n_kv_heads, or n_heads when 0)" if name == "kv_heads" else "query heads"
                    raise ConfigError(key, size, f"must divide the {noun} of {where}, {heads}: each of the {size} "
                                      f"processes sharing a sample attends with a slice of them")
        if backbone.drop_path:
            raise ConfigError(key, size, f"cannot be combined with model.backbone.drop_path={backbone.drop_path}: "
                              f"stochastic depth drops a sample's branch whole, and the processes sharing it would "
                              f"draw apart; set drop_path=0")


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
    if name not in PRESETS:
        raise ConfigError("model.preset", name, f"unknown model preset; known: {', '.join(PRESETS.names())}")
    own = {key: value for key, value in model.items() if key != "preset"}
    return {**tree, "model": merged(to_dict(PRESETS.get(name).model), own)}


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
