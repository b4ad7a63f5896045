"""Checkpoint families: one library's model kind, mapped to a polytrain architecture and back.

A ``Family`` (one per Hugging Face architecture, and ``timm`` for timm's ViT)
derives the polytrain ``Architecture`` from the checkpoint's own config (a
``config.json`` dict; for timm, the model name and arguments), writes the
library's config for a polytrain architecture, and lists the ``Rule``s that tie
the tensors.  ``FAMILIES`` holds them by ``architectures[0]`` and
``model_type``; ``family_of`` picks one for a config.

Export checks that the written config describes the model exactly: the
family derives an architecture from it again, and the first setting that
came back different is one the library cannot express, named in the error.
"""

import dataclasses
import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from polytrain.models.backbone import BackboneConfig
from polytrain.models.convert.rules import ConversionError, Rule, export_state, import_state
from polytrain.models.embed import EmbedConfig
from polytrain.models.heads import HeadsConfig
from polytrain.models.model import ModelConfig, PolyModel
from polytrain.registry import Registry
from polytrain.tokens import EmbedSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Architecture:
    """A polytrain model shaped like a checkpoint: the model config, its one embed spec, its head."""

    model: ModelConfig
    spec: EmbedSpec
    """Text: (vocabulary, (1, max positions)); image: (channels * patch * patch, patch grid)."""
    head: str
    """The head a task on this model uses (``decoder_only``, ``encoder_classifier``, ...)."""
    channels: int = 3
    """Image channels: an image spec's patches hold channels x side x side features, which alone do not say
    how many of each (768 is 3 x 16 x 16 and 12 x 8 x 8)."""

    def build(self, task: str) -> PolyModel:
        return PolyModel(self.model, [self.spec], {task: self.head})


class Family(ABC):
    """How one library's model kind maps onto polytrain."""

    name = ""
    """Hugging Face ``architectures[0]`` (``timm`` for timm)."""
    model_type = ""
    """Hugging Face ``model_type`` (timm: "")."""
    by_model_type = True
    """A config naming only ``model_type``, no architecture, means this family (false where several share it)."""
    modality = "text"
    """The modality of the checkpoint's input: the embed spec export reads off the model."""
    base_prefix = ""
    """Prefix of the base model's tensors (``transformer.``), which base-model files leave out."""
    unused = ""
    """Regex of tensors this library's class does not use either (buffers, other heads); dropped on import."""

    @abstractmethod
    def architecture(self, config: dict) -> Architecture:
        """polytrain's shape of a checkpoint with this config; ConversionError names a setting it has no match for."""

    @abstractmethod
    def library_config(self, arch: Architecture) -> dict:
        """The library's config (``config.json``) of a model shaped like ``arch``."""

    @abstractmethod
    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        """The tensor rules of ``arch`` with its head serving task ``task``."""

    def zeros(self, arch: Architecture) -> dict[str, tuple[int, ...]]:
        """Their tensors polytrain has no place for that must be zero: accepted only so, written as zeros."""
        return {}

    def with_dtype(self, config: dict, dtype: torch.dtype) -> dict:
        """``config`` for tensors of ``dtype`` (where the library's config records it)."""
        return config

    def prepare(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` under the names the rules use: base-model files prefixed, tensors nobody uses dropped."""
        if self.base_prefix and not any(name.startswith(self.base_prefix) for name in state):
            state = {self.base_prefix + name: t for name, t in state.items()}
        dropped = sorted(name for name in state if self.unused and re.search(self.unused, name))
        if dropped:
            log.info("%s: skipping %d tensors the library does not use either: %s", self.name, len(dropped),
                     ", ".join(dropped[:4]) + (", ..." if len(dropped) > 4 else ""))
        return {name: t for name, t in state.items() if name not in dropped}


class HFFamily(Family):
    """A Hugging Face ``transformers`` model class; its config names the class and the tensors' dtype."""

    def library_config(self, arch: Architecture) -> dict:
        return {"architectures": [self.name], "model_type": self.model_type, **self.settings(arch)}

    @abstractmethod
    def settings(self, arch: Architecture) -> dict:
        """The config keys of this class (beyond its name) that describe ``arch``."""

    def with_dtype(self, config: dict, dtype: torch.dtype) -> dict:
        return {**config, "dtype": str(dtype).removeprefix("torch.")}  # from_pretrained loads in this dtype


FAMILIES: Registry[Family] = Registry("checkpoint family")
"""Families by Hugging Face ``architectures[0]`` and ``model_type``, and ``timm``."""


def register(family: Family) -> Family:
    FAMILIES.register(family.name)(family)
    if family.model_type and family.by_model_type:
        FAMILIES.register(family.model_type)(family)
    return family


def family_of(config: dict) -> Family:
    """The family of a ``config.json``: its ``architectures[0]``, else its ``model_type``; timm's has ``architecture``."""
    if "architecture" in config:
        return FAMILIES.get("timm")
    architectures = config.get("architectures") or []
    return FAMILIES.get(architectures[0] if architectures else config.get("model_type", "<no model_type>"))


def expect(config: dict, key: str, allowed: Any, why: str, source: str) -> None:
    """Refuse a config whose ``key`` is set to anything but ``allowed`` (absent or None counts as allowed)."""
    if config.get(key) not in (None, allowed):
        raise ConversionError(f"{source} config {key}={config[key]!r}: polytrain {why} (it takes {allowed!r})")


HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
"""Hugging Face ``hidden_act`` / ``activation_function`` -> polytrain ``backbone.mlp``; export writes the first name."""


def hf_activation_to_mlp(name: str, key: str, source: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConversionError(f"{source} config {key}={name!r}: polytrain has no such MLP; "
                              f"known: {', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]


def mlp_to_hf_activation(mlp: str, source: str) -> str:
    names: dict[str, str] = {}
    for theirs, ours in HF_ACTIVATIONS.items():
        names.setdefault(ours, theirs)
    if mlp not in names:
        raise ConversionError(f"{source} cannot express model.backbone.mlp={mlp!r}; it takes {', '.join(sorted(names))}")
    return names[mlp]


RUNTIME = ("dropout", "drop_path", "attention", "checkpointing", "compile")
"""Backbone settings of how a model trains or runs, not of what it computes (nor is ``init_std``, nor are
``heads``, but for the classifier's shape): a checkpoint config need not carry them."""
TEXT_ONLY = ("scale_tokens", "token_types", "decoder_positions")
IMAGE_ONLY = ("patch_positions", "cls_token")
"""Embed settings that only the text (image) embedder reads."""


def defaults(obj, fields: tuple[str, ...]):
    """The config ``obj`` with ``fields`` back at their defaults."""
    fresh = type(obj)()
    return replace(obj, **{name: getattr(fresh, name) for name in fields})


def essentials(arch: Architecture) -> Architecture:
    """``arch`` with every setting that does not change what a family's model computes made uniform."""
    b = arch.model.backbone
    qkv_bias, out_bias, mlp_bias = b.biases
    b = replace(defaults(b, RUNTIME), n_kv_heads=b.kv_heads, mlp_width=b.mlp_hidden, mlp_ratio=BackboneConfig.mlp_ratio,
                bias=True, qkv_bias=qkv_bias, out_bias=out_bias, mlp_bias=mlp_bias,
                rope_base=b.rope_base if b.position == "rope" else BackboneConfig.rope_base)
    text = arch.spec.modality == "text"
    embed = defaults(arch.model.embed, IMAGE_ONLY if text else TEXT_ONLY)
    heads = HeadsConfig()
    if arch.head == "encoder_classifier":
        heads = replace(heads, classifier=arch.model.heads.classifier)
    model = defaults(arch.model, ("init_std",) if text else ("init_std", "tie_embeddings", "lm_bias"))
    return replace(arch, model=replace(model, backbone=b, embed=embed, heads=heads))


def first_difference(ours: Any, theirs: Any, key: str) -> tuple[str, Any, Any] | None:
    """The dotted key of the first field where two config trees differ, with both values."""
    if dataclasses.is_dataclass(ours) and type(ours) is type(theirs):
        for f in dataclasses.fields(ours):
            found = first_difference(getattr(ours, f.name), getattr(theirs, f.name), f"{key}.{f.name}")
            if found:
                return found
        return None
    return None if ours == theirs else (key, ours, theirs)


def export_config(family: Family, arch: Architecture) -> dict:
    """``family.library_config(arch)``, checked to describe ``arch`` in every setting that matters."""
    config = family.library_config(arch)
    ours, back = essentials(arch), essentials(family.architecture(config))
    found = (first_difference(ours.model, back.model, "model")
             or first_difference(ours.spec, back.spec, f"{arch.spec.modality} embed spec")
             or first_difference(ours.head, back.head, "head")
             or first_difference(ours.channels, back.channels, "image channels"))
    if found:
        key, value, nearest = found
        raise ConversionError(f"{family.name} cannot express {key}={value!r} (its config gives back {nearest!r})")
    return config


def architecture_of(model: PolyModel, family: Family, task: str, channels: int = 3) -> Architecture:
    """The architecture of ``model`` as ``family`` sees it, with the head of ``task`` (images of ``channels``)."""
    if task not in model.task_heads:
        raise ConversionError(f"the model has no task {task!r}; its tasks: {', '.join(sorted(model.task_heads))}")
    if family.modality not in model.specs:
        raise ConversionError(f"{family.name} reads {family.modality}, which the model has no embedder for "
                              f"(it has {', '.join(sorted(model.specs))})")
    return Architecture(model.cfg, model.specs[family.modality], model.task_heads[task], channels)


def import_weights(model: PolyModel, family: Family, arch: Architecture, task: str, state: dict[str, Tensor]) -> None:
    """Fill ``model`` (built from ``arch``) from a ``family`` checkpoint's tensors; errors name the tensor."""
    import_state(model, family.prepare(state), family.rules(arch, task), family.name, tuple(family.zeros(arch)))


def export_weights(model: PolyModel, family: Family, task: str, channels: int = 3, restored: bool = False
                   ) -> tuple[dict, dict[str, Tensor]]:
    """The library's config and tensors of ``model`` with the head of ``task`` (images of ``channels``).

    ``restored``: include the copies the library ties itself (for ``load_state_dict(strict=True)``;
    its own files leave them out).
    """
    arch = architecture_of(model, family, task, channels)
    config = export_config(family, arch)
    state = export_state(model, family.rules(arch, task), restored)
    dtype = next(iter(state.values())).dtype
    state.update({name: torch.zeros(shape, dtype=dtype) for name, shape in family.zeros(arch).items()})
    return family.with_dtype(config, dtype), state
