"""Checkpoints of other libraries in, polytrain models back out: the entry points of ``convert``.

    checkpoint = read_external(Path("qwen2-0.5b"))             # a save_pretrained folder
    model = checkpoint.build("lm")                              # its architecture and weights, as task "lm"
    write_external(model, "lm", "Qwen2ForCausalLM", Path("out"))
    vit = read_external(Path("vit.safetensors"), timm_model="vit_small_patch16_224").build("classify")
"""

from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from polytrain.config.registries import FAMILIES
from polytrain.models.convert.expressible import checked_config
from polytrain.models.convert.family import Architecture, Family, family_of
from polytrain.models.convert.files import (
    CONFIG,
    PICKLE_SUFFIXES,
    PREPROCESSOR,
    TOKENIZER,
    TokenizerFiles,
    check_sharded,
    folder_weights,
    read_json,
    read_weights,
    refuse_pickle,
    special_tokens,
    token_names,
    weights_file,
    write_folder,
)
from polytrain.models.convert.rules import ConversionError, NoPlace, export_state, import_state
from polytrain.models.model import PolyModel, with_classes


@dataclass
class ExternalCheckpoint:
    """A checkpoint of another library, opened: its family, config, polytrain architecture, files, tokenizer."""

    family: Family
    config: dict
    """``config.json``; for a bare timm file, timm's form of it: ``{"architecture": name, "model_args": {...}}``."""
    architecture: Architecture
    files: list[Path]
    """Its weight files (one, or the shards its index lists), checked to be there."""
    index: Path | None
    """The shard index, for a sharded folder."""
    tokenizer: Path | None
    """Its ``tokenizer.json``, if it has one."""
    special: dict[str, str]
    """Its special tokens by role (bos, eos, pad, mask, unk), as far as its files name them."""
    preprocessing: dict[str, dict] = field(default_factory=dict)
    """Tokenizer settings by modality its preprocessing gives (``Family.preprocessing``)."""

    def as_towers(self, modalities: set[str]) -> "ExternalCheckpoint":
        """This checkpoint read as a tower where a run takes its ``modalities`` embedder as one and its own
        architecture is not a tower yet (a plain timm ViT classifier); else itself."""
        arch = self.architecture
        reads = {arch.spec.modality, *(spec.modality for spec in arch.others)}
        if not (modalities & reads) - set(arch.model.towers):
            return self
        tower = self.family.tower_architecture(self.config)
        if tower is None:
            raise ConversionError(f"a {self.family.name} checkpoint cannot be read as a tower of "
                                  f"{', '.join(sorted(modalities & reads))}")
        return replace(self, architecture=tower)

    @cached_property
    def state(self) -> dict[str, Tensor]:
        """Its tensors, read on first use (the architecture is known before: a checkpoint polytrain cannot express
        fails before any weight is read)."""
        state = read_weights(self.files)
        if self.index is not None:
            check_sharded(self.index, state)
        return state

    def build(self, task: str) -> PolyModel:
        """A polytrain model shaped like the checkpoint, holding its weights, its head serving ``task``."""
        model = self.architecture.build(task)
        import_weights(model, self.family, self.architecture, task, self.state)
        return model


def read_external(path: Path, timm_model: str | None = None, model_args: dict | None = None) -> ExternalCheckpoint:
    """A ``save_pretrained`` folder (Hugging Face or timm), or a ``.safetensors`` file of timm model ``timm_model``.

    ``model_args``: the keyword arguments the timm model was created with (``num_classes``, ``img_size``, ...).
    """
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    if path.is_dir():
        config = read_json(path / CONFIG)
        family = family_of(config)
        architecture = family.architecture(config)
        tokenizer = path / TOKENIZER
        preprocessor = read_json(path / PREPROCESSOR) if (path / PREPROCESSOR).is_file() else {}
        special = family.special_roles(config, special_tokens(path, config), token_names(tokenizer))
        return ExternalCheckpoint(family, config, architecture, *folder_weights(path),
                                  tokenizer if tokenizer.is_file() else None, special,
                                  family.preprocessing(config, preprocessor))
    if path.suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    if timm_model is None:
        raise ConversionError(f"{path}: a lone weights file has no config; name its timm model, or give the "
                              "save_pretrained folder it came from")
    config = {"architecture": timm_model, "model_args": dict(model_args or {})}
    family = FAMILIES.get("timm")
    return ExternalCheckpoint(family, config, family.architecture(config), [weights_file(path)], None, None, {},
                              family.preprocessing(config, {}))


def architecture_of(model: PolyModel, family: Family, task: str, channels: int = 3) -> Architecture:
    """The architecture of ``model`` as ``family`` sees it, with the head of ``task`` (images of ``channels``)."""
    if task not in model.task_heads:
        raise ConversionError(f"the model has no task {task!r}; its tasks: {', '.join(sorted(model.task_heads))}")
    if family.modality not in model.specs:
        raise ConversionError(f"{family.name} reads {family.modality}, which the model has no embedder for "
                              f"(it has {', '.join(sorted(model.specs))})")
    head, cfg = model.task_heads[task], model.cfg
    if head == "encoder_classifier":  # a task's own class count, which model.heads.classifier need not say
        cfg = with_classes(cfg, model.heads[task].proj.out_features)
    others = tuple(model.specs[m] for m in cfg.towers if m in model.specs and m != family.modality)
    return Architecture(cfg, model.specs[family.modality], head, channels, others)


def import_weights(model: PolyModel, family: Family, arch: Architecture, task: str, state: dict[str, Tensor]) -> None:
    """Fill ``model`` (built from ``arch``) from a ``family`` checkpoint's tensors; errors name the tensor."""
    state = family.without_unread(family.prepare(state), arch)
    import_state(model, state, family.rules(arch, task), family.name, tuple(family.zeros(arch)))


def export_weights(model: PolyModel, family: Family, task: str, channels: int = 3, restored: bool = False,
                   left_out: tuple[str, ...] = ()) -> tuple[dict, dict[str, Tensor]]:
    """The library's config and tensors of ``model`` with the head of ``task`` (images of ``channels``).

    ``restored``: include the copies the library ties itself (for ``load_state_dict(strict=True)``;
    its own files leave them out).  A tensor of ``model`` the family has no place for is an error naming it,
    unless it is under one of the ``left_out`` prefixes (parts ``task`` does not use: another task's head).
    """
    arch = architecture_of(model, family, task, channels)
    rules = family.rules(arch, task)
    covered = {rule.ours for rule in rules}
    left = [name for name in model.state_dict() if name not in covered and not name.startswith(left_out)]
    if left:  # checked first: a part the class has no place for says more than the settings of the rest
        parts = sorted({name.split(".")[0] if name.startswith("lm_head.") else ".".join(name.split(".")[:2])
                        for name in left})
        raise NoPlace(f"{family.name} cannot express {left[0]} ({len(left)} tensors of the model have no place in "
                      f"it: {', '.join(parts)})")
    config = checked_config(family, arch)
    state = export_state(model, rules, restored)
    dtype = next(iter(state.values())).dtype
    state.update({name: torch.zeros(shape, dtype=dtype) for name, shape in family.zeros(arch).items()})
    state.update({name: t.to(dtype) for name, t in family.placeholders(arch).items()})
    return family.with_dtype(config, dtype), state


def load_state(model: PolyModel, task: str, family: str, state: dict[str, Tensor], channels: int = 3) -> None:
    """Fill a built ``model`` (a preset, say) from a ``family`` state dict in memory, its head serving ``task``.

    ``channels``: of the images the model reads.
    """
    fam = FAMILIES.get(family)
    import_weights(model, fam, architecture_of(model, fam, task, channels), task, state)


def write_external(model: PolyModel, task: str, family: str, folder: Path, tokenizer: TokenizerFiles | None = None,
                   channels: int = 3, left_out: tuple[str, ...] = ()) -> dict:
    """Save ``model`` with the head of ``task`` as a ``family`` checkpoint folder the library loads; its config.

    ``tokenizer``: the text tokenizer to write beside the weights (its special tokens' ids go into the config, as
    ``generate`` reads them); ``channels``: of the images the model reads; ``left_out``: as ``export_weights``.
    """
    fam = FAMILIES.get(family)
    config, state = export_weights(model, fam, task, channels, left_out=left_out)
    if tokenizer is not None:
        config = fam.token_ids(config, {role: i for role, (_, i) in tokenizer.special.items()})
    write_folder(folder, config, state, tokenizer)
    return config
