"""Checkpoint families: one library's model kind, mapped to a polytrain architecture and back.

A ``Family`` (one per Hugging Face architecture, and ``timm`` for timm's ViTs)
derives the polytrain ``Architecture`` from the checkpoint's own config (a
``config.json`` dict; for timm, the model name and arguments), writes the
library's config for a polytrain architecture, and lists the ``Rule``s that tie
the tensors.  ``config.registries.FAMILIES`` names them by ``architectures[0]`` and
``model_type``; ``family_of`` picks one for a config.

A checkpoint of an encoder alone (a CLIP, SigLIP or DINOv2 ViT) is a model of one tower and no head; a
plain ViT classifier can be read that way too (``tower_architecture``), when a run takes it as a tower.

"""

import logging
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polytrain.config.model import ModelConfig
from polytrain.config.registries import FAMILIES
from polytrain.config.tower import TowerConfig
from polytrain.models.convert.rules import ConversionError, Rule
from polytrain.models.model import PolyModel
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
    others: tuple[EmbedSpec, ...] = ()
    """The embed specs of the modalities its towers read besides ``spec`` (LLaVA's images, Whisper's audio)."""

    def build(self, task: str) -> PolyModel:
        """Its model, the head serving ``task`` (a tower alone has no head)."""
        return PolyModel(self.model, [self.spec, *self.others], {task: self.head} if self.head else {})


class Family(ABC):
    """How one library's model kind maps onto polytrain."""

    name = ""
    """Hugging Face ``architectures[0]`` (``timm`` for timm)."""
    model_type = ""
    """Hugging Face ``model_type`` (timm: "")."""
    modality = "text"
    """The modality of the checkpoint's input: the embed spec export reads off the model."""
    head = ""
    """The polytrain head its model is (``decoder_only``, ``masked_lm``, ...): which task of a model it exports."""
    span_slots = False
    """It reads the spans in text as one modality token per vector, attended causally (LLaVA): a run it writes laid
    them out so (``tokenizers.text.span_markers: false``, ``span_attention: causal``)."""
    base_prefix = ""
    """Prefix of the base model's tensors (``transformer.``), which base-model files leave out."""
    unused = ""
    """Regex of tensors this library's class does not use either (buffers, other heads); dropped on import."""

    @abstractmethod
    def architecture(self, config: dict) -> Architecture:
        """polytrain's shape of a checkpoint with this config; a ConversionError names a setting it cannot follow."""

    @abstractmethod
    def library_config(self, arch: Architecture) -> dict:
        """The library's config (``config.json``) of a model shaped like ``arch``."""

    @abstractmethod
    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        """The tensor rules of ``arch`` with its head serving task ``task``."""

    def zeros(self, arch: Architecture) -> dict[str, tuple[int, ...]]:
        """Their tensors polytrain has no place for that must be zero: accepted only so, written as zeros."""
        return {}

    def unread(self, arch: Architecture) -> str:
        """Regex of their tensors ``arch`` does not read (a tower's blocks after its selected layer, a norm its
        features skip): dropped on import, each listed."""
        return ""

    def placeholders(self, arch: Architecture) -> dict[str, Tensor]:
        """Tensors the library's class holds but a model of ``arch`` does not use (CLIP's post-norm of the pooled
        class token under LLaVA): written on export with these values, dropped on import by ``unused``."""
        return {}

    def tower_architecture(self, config: dict) -> Architecture | None:
        """The checkpoint read as towers and no head (a plain ViT classifier as an image tower), where its default
        ``architecture`` is not already one; None where it cannot be read so."""
        return None

    def preprocessing(self, config: dict, preprocessor: dict) -> dict[str, dict[str, Any]]:
        """Tokenizer settings by modality that the checkpoint's preprocessing gives (image side, mean and std, the
        resize; the mel bins and hop), from its config and ``preprocessor_config.json`` ({} where absent)."""
        return {}

    def token_ids(self, config: dict, ids: dict[str, int]) -> dict:
        """``config`` with the ids of the run's special tokens by role (bos, eos, pad, image) that the library's
        config records."""
        return {**config, **{f"{role}_token_id": i for role, i in ids.items() if role in ("bos", "eos", "pad")}}

    def special_roles(self, config: dict, special: dict[str, str], names: dict[int, str]) -> dict[str, str]:
        """The roles of the checkpoint's special tokens as polytrain uses them, from what its files name
        (``special``) and its tokenizer's id -> token ``names``."""
        return special

    def with_dtype(self, config: dict, dtype: torch.dtype) -> dict:
        """``config`` for tensors of ``dtype`` (where the library's config records it)."""
        return config

    def prepare(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``state`` under the names the rules use: base-model files prefixed, tensors nobody uses dropped."""
        if self.base_prefix and not any(name.startswith(self.base_prefix) for name in state):
            state = {self.base_prefix + name: t for name, t in state.items()}
        dropped = sorted(name for name in state if self.unused and re.search(self.unused, name))
        return drop(self.name, state, dropped, "the library does not use either")

    def without_unread(self, state: dict[str, Tensor], arch: Architecture) -> dict[str, Tensor]:
        """``state`` without the tensors ``arch`` does not read (``unread``)."""
        pattern = self.unread(arch)
        return drop(self.name, state, sorted(n for n in state if pattern and re.search(pattern, n)), "unread")


def tower_unread(tower: TowerConfig, blocks: str, norm: str) -> list[str]:
    """Regexes of an encoder checkpoint's tensors ``tower`` does not read: its blocks after the selected layer
    (``blocks``: the escaped name before a block's index) and, where its features skip it, its final norm
    (``norm``, escaped)."""
    later = [f"^{blocks}{i}\\." for i in range(tower.built_layers, tower.layers)]
    return later + ([] if tower.final_norm else [f"^{norm}\\."])


def drop(source: str, state: dict[str, Tensor], dropped: list[str], why: str) -> dict[str, Tensor]:
    """``state`` without ``dropped``, logged."""
    if dropped:
        log.info("%s: skipping %d tensors %s: %s", source, len(dropped), why,
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


def family_of(config: dict) -> Family:
    """The family of a ``config.json``: its ``architectures[0]``, else its ``model_type``; timm's names an
    ``architecture``."""
    if "architecture" in config:
        return FAMILIES.get("timm")
    architectures = config.get("architectures") or [config.get("model_type")]
    if not architectures[0]:
        raise ConversionError("config.json names neither its architectures nor its model_type")
    return FAMILIES.get(architectures[0])


def expect(config: dict, key: str, allowed: Any, why: str, source: str) -> None:
    """Refuse a config whose ``key`` is set to anything but ``allowed`` (absent or None counts as allowed)."""
    if config.get(key) not in (None, allowed):
        raise ConversionError(f"{source} config {key}={config[key]!r}: polytrain {why} (it takes {allowed!r})")


HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu",
                  "relu": "relu"}
"""Hugging Face ``hidden_act`` / ``activation_function`` -> polytrain ``backbone.mlp``; export writes the first
name of each."""


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
        raise ConversionError(f"{source} cannot express model.backbone.mlp={mlp!r}; "
                              f"it takes {', '.join(sorted(names))}")
    return names[mlp]
