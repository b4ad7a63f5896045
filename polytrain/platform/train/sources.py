"""The checkpoints a run's weights start from (``finetune.init_from``, ``finetune.init_parts``), and the tensors
each gives the model.

A source is polytrain's own (a run directory, a checkpoint folder, an export:
its tensors match the model's by name) or another library's (a Hugging Face or
timm ``save_pretrained`` folder, a timm ``.safetensors`` file: its tensors go
through its family's converter, ``polytrain.models.convert``).  ``init_from``
fills every part its checkpoint has; each ``init_parts`` entry fills the parts
it lists, and the checkpoint's other tensors are ignored.  A foreign
checkpoint's head (BERT's classifier, timm's) goes to the run's tasks of the
same head, or to the ``heads.<task>`` part that names it.  Nothing is ever
unpickled.
"""

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from safetensors import safe_open
from torch import Tensor

from polytrain.config.train import FinetuneConfig, WeightsSource
from polytrain.errors import ConfigError, DataError, PolytrainError
from polytrain.models.convert import ExternalCheckpoint, read_external
from polytrain.models.convert.files import CONFIG
from polytrain.platform.train.derive_towers import read_as_towers
from polytrain.platform.train.init_from import Offered, Pretrained, by_name, read_pretrained

SOURCE_TASK = "source"
"""The task a foreign checkpoint's own head is converted under, before it goes to the run's tasks."""


def part_of(name: str) -> str:
    """The part a tensor belongs to: ``embedders.text``, ``backbone.decoder``, ``lm_head``, ``heads.<task>``."""
    first, _, rest = name.partition(".")
    return first if first == "lm_head" else f"{first}.{rest.partition('.')[0]}"


@dataclass
class Source:
    """One checkpoint a run starts from, opened: its config read and checked, its weights not yet."""

    key: str
    """The config key that names it: ``finetune.init_from`` or ``finetune.init_parts.<name>``."""
    path: Path
    parts: list[str]
    """The parts it fills ([]: every part it has, as ``init_from`` takes them)."""
    pretrained: Pretrained | None = None
    """A polytrain checkpoint."""
    external: ExternalCheckpoint | None = None
    """Another library's checkpoint."""

    @property
    def name(self) -> str:
        return f"{self.key} ({self.path})"

    @property
    def family(self) -> str:
        return "polytrain" if self.external is None else self.external.family.name

    @cached_property
    def has(self) -> list[str]:
        """The parts it holds (a foreign head as ``heads.source``), from its converter's rules or its file's names."""
        if self.external is not None:
            names = [rule.ours for rule in self.external.family.rules(self.external.architecture, SOURCE_TASK)]
        else:
            with safe_open(str(self.pretrained.path), "pt") as f:
                names = list(f.keys())
        return list(dict.fromkeys(map(part_of, names)))

    def reading_towers(self, towers: set[str]) -> "Source":
        """This source with its checkpoint read as towers of the ``towers`` modalities whose embedders it fills (a
        plain timm ViT classifier under a run that takes its image embedder as a tower); else itself."""
        if self.external is None or not towers:
            return self
        read = read_as_towers(self.external, self.parts, towers)
        return self if read is self.external else replace(self, external=read)

    def filled(self, task_heads: dict[str, str]) -> list[str]:
        """The parts of a run with tasks ``task_heads`` that come from this checkpoint."""
        if self.parts:
            return self.parts
        head = f"heads.{SOURCE_TASK}"
        targets = [f"heads.{task}" for task in self.head_targets(task_heads)] if head in self.has else []
        return [part for part in self.has if part != head] + targets

    def tokenizer_json(self) -> str | None:
        """The text tokenizer its text embedder's rows belong to."""
        if self.pretrained is not None:
            return self.pretrained.tokenizer_json
        tokenizer = self.external.tokenizer
        if tokenizer is None:
            raise DataError(f"{self.name}: no tokenizer.json beside the weights; its text embedder's rows are the ids "
                            "of the tokenizer it was trained with, so the run needs that file")
        return tokenizer.read_text(encoding="utf-8")

    def offer(self, own: set[str], task_heads: dict[str, str], tokenizer: bool) -> Offered:
        """Its tensors for a model whose state-dict names are ``own`` and whose tasks use ``task_heads``; a tower's
        that the model does not build (blocks after its selected layer, a final norm it skips) are ignored.  A
        checkpoint the run takes as towers is read so already (``reading_towers``, when the job derived its
        config)."""
        if self.external is None:
            tensors = self.pretrained.weights()
        else:
            tensors = renamed_heads(self.external.build(SOURCE_TASK).state_dict(), self.head_targets(task_heads))
        if self.external is None and not self.parts:  # polytrain's own: matched by name
            return replace(by_name(self.name, tensors, own), tokenizer=tokenizer)
        if self.parts:
            chosen = {name: t for name, t in tensors.items() if part_of(name) in self.parts}
        else:  # all of it but a head no task takes
            chosen = {name: t for name, t in tensors.items() if part_of(name) != f"heads.{SOURCE_TASK}"}
        unbuilt = {name for name in set(chosen) - own if ".tower." in name}
        chosen = {name: t for name, t in chosen.items() if name not in unbuilt}
        misplaced = sorted(set(chosen) - own)
        if misplaced:
            raise DataError(f"{self.name}: {misplaced[0]} {tuple(chosen[misplaced[0]].shape)} has no place in the "
                            f"model (configure the model like the checkpoint, or leave {part_of(misplaced[0])} "
                            "out of its parts)")
        ignored = [name for name in tensors if name not in chosen]
        return Offered(self.name, self.family, self.parts, chosen, ignored, tokenizer)

    def head_targets(self, task_heads: dict[str, str]) -> list[str]:
        """The run's tasks that get a foreign checkpoint's own head: those its parts name, or (all parts) every task
        with the same head."""
        if self.parts:
            return [part.partition(".")[2] for part in self.parts if part.startswith("heads.")]
        return [task for task, head in task_heads.items() if head == self.external.architecture.head]


def renamed_heads(state: dict[str, Tensor], tasks: list[str]) -> dict[str, Tensor]:
    """``state`` with the converted head (``heads.source.*``) given to each of ``tasks`` instead."""
    prefix = f"heads.{SOURCE_TASK}."
    out = {name: t for name, t in state.items() if not name.startswith(prefix)}
    for name, t in state.items():
        if name.startswith(prefix):
            for task in tasks:
                out[f"heads.{task}.{name.removeprefix(prefix)}"] = t
            if not tasks:
                out[name] = t  # no task takes it: reported as ignored
    return out


def open_sources(cfg: FinetuneConfig) -> list[Source]:
    """Every checkpoint the finetune section names, opened and checked (files there, no pickle, a config polytrain
    can follow, every listed part in it); errors name the key."""
    named = [("finetune.init_from", cfg, [])] if cfg.init_from else \
        [(f"finetune.init_parts.{name}", entry, entry.parts) for name, entry in cfg.init_parts.items()]
    return [open_source(key, spec, parts) for key, spec, parts in named]


def open_source(key: str, spec: WeightsSource, parts: list[str]) -> Source:
    path, path_key = Path(spec.init_from), f"{key}.init_from" if key != "finetune.init_from" else key
    if not path.exists():
        raise ConfigError(path_key, spec.init_from, "no such file or directory on this machine")
    try:
        if is_foreign(path, spec):
            source = Source(key, path, parts, external=read_external(path, spec.timm_model, spec.timm_args))
        else:
            source = Source(key, path, parts, pretrained=read_pretrained(path))
    except PolytrainError as err:  # an unreadable file, a family or setting polytrain does not follow
        raise ConfigError(path_key, spec.init_from, str(err)) from None
    has = source.has
    for index, part in enumerate(parts):
        if part not in has and not (part.startswith("heads.") and f"heads.{SOURCE_TASK}" in has):
            raise DataError(f"{key}.parts.{index}: {source.path} ({source.family}) has no {part}; it has "
                            f"{', '.join(p.replace(f'heads.{SOURCE_TASK}', 'a head') for p in has)}")
    return source


def is_foreign(path: Path, spec: WeightsSource) -> bool:
    """Another library's checkpoint: a folder with a ``config.json``, or a file named with its timm model."""
    return (path / CONFIG).is_file() if path.is_dir() else spec.timm_model is not None


def text_source(sources: list[Source], task_heads: dict[str, str]) -> Source | None:
    """The checkpoint the text embedder comes from: its tokenizer is the run's."""
    return next((source for source in sources if "embedders.text" in source.filled(task_heads)), None)


def offers(sources: list[Source], own: set[str], task_heads: dict[str, str]) -> list[Offered]:
    """What each source gives a model with state-dict names ``own`` and tasks ``task_heads``."""
    text = text_source(sources, task_heads)
    return [source.offer(own, task_heads, source is text) for source in sources]
