"""Whether a library's config describes a polytrain model exactly, and the first setting where it does not.

Export writes the family's config for the model, derives an architecture
from that config again and compares the two in every setting that changes
what the model computes: the first one that came back different is one the
library cannot express, and the error names it with both values.
"""

import dataclasses
from dataclasses import replace
from typing import Any

from polytrain.config.model import BackboneConfig, HeadsConfig
from polytrain.config.tower import TowerConfig
from polytrain.models.convert.family import Architecture, Family
from polytrain.models.convert.rules import ConversionError
from polytrain.tokens import EmbedSpec

RUNTIME = ("dropout", "drop_path", "attention", "checkpointing", "compile")
"""Backbone settings of how a model trains or runs, not of what it computes (nor do ``init_std`` and the
``heads`` settings, but for the classifier's shape): a checkpoint's config need not carry them."""
TEXT_ONLY = ("scale_tokens", "token_types", "decoder_positions")
"""Embed settings only the text embedder reads."""
IMAGE_ONLY = ("patch_positions", "cls_token")
"""Embed settings only the image embedder reads."""


def defaults(obj: Any, fields: tuple[str, ...]) -> Any:
    """The config dataclass ``obj`` with ``fields`` back at their defaults."""
    fresh = type(obj)()
    return replace(obj, **{name: getattr(fresh, name) for name in fields})


def essential_backbone(b: BackboneConfig) -> BackboneConfig:
    """``b`` with its runtime settings at their defaults and every block setting spelled one way (key/value heads,
    MLP width and biases explicit, the RoPE base only under RoPE)."""
    qkv_bias, out_bias, mlp_bias = b.biases
    return replace(defaults(b, RUNTIME), n_kv_heads=b.kv_heads, mlp_width=b.mlp_hidden,
                   mlp_ratio=BackboneConfig.mlp_ratio, bias=True, qkv_bias=qkv_bias, out_bias=out_bias,
                   mlp_bias=mlp_bias, rope_base=b.rope_base if b.position == "rope" else BackboneConfig.rope_base)


def essential_tower(tower: TowerConfig, spec: EmbedSpec) -> TowerConfig:
    """``tower`` as it is built: its blocks up to the selected layer and the features the last of them, its position
    table's size spelled out (0: the tokenizer's grid)."""
    positions = tower.positions or (spec.grid[1] if tower.stem == "conv" else spec.grid[0])
    return replace(defaults(tower, ("dropout",)), layers=tower.built_layers, feature_layer=-1, positions=positions)


def tower_spec(spec: EmbedSpec, tower: TowerConfig) -> EmbedSpec:
    """``spec`` with the grid of ``tower``'s position table: a tower reads other grids (an image's, a shorter
    clip's) as well."""
    return replace(spec, grid=(1, tower.positions) if tower.stem == "conv" else (tower.positions, tower.positions))


def essentials(arch: Architecture) -> Architecture:
    """``arch`` with every setting that does not change what its model computes made uniform."""
    b = essential_backbone(arch.model.backbone)
    text = arch.spec.modality == "text"
    embed = defaults(arch.model.embed, IMAGE_ONLY if text else TEXT_ONLY)
    heads = HeadsConfig()
    if arch.head == "encoder_classifier":
        heads = replace(heads, classifier=arch.model.heads.classifier)
    model = defaults(arch.model, ("init_std",) if text else ("init_std", "tie_embeddings", "lm_bias"))
    specs = {s.modality: s for s in (arch.spec, *arch.others)}
    towers = {m: essential_tower(t, specs[m]) for m, t in arch.model.towers.items() if m in specs}
    others = tuple(tower_spec(s, towers[s.modality]) if s.modality in towers else s for s in arch.others)
    return replace(arch, model=replace(model, backbone=b, embed=embed, heads=heads, towers=towers), others=others)


def first_difference(ours: Any, theirs: Any, key: str) -> tuple[str, Any, Any] | None:
    """The dotted key of the first field where two config trees differ, with both values."""
    if dataclasses.is_dataclass(ours) and type(ours) is type(theirs):
        for f in dataclasses.fields(ours):
            found = first_difference(getattr(ours, f.name), getattr(theirs, f.name), f"{key}.{f.name}")
            if found:
                return found
        return None
    if isinstance(ours, dict) and isinstance(theirs, dict) and ours.keys() == theirs.keys():
        return next(filter(None, (first_difference(ours[k], theirs[k], f"{key}.{k}") for k in ours)), None)
    return None if ours == theirs else (key, ours, theirs)


def checked_config(family: Family, arch: Architecture) -> dict:
    """``family.library_config(arch)``, checked to describe ``arch`` in every setting that matters."""
    config = family.library_config(arch)
    ours, back = essentials(arch), essentials(family.architecture(config))
    found = (first_difference(ours.model, back.model, "model")
             or first_difference(ours.spec, back.spec, f"{arch.spec.modality} embed spec")
             or first_difference(ours.head, back.head, "head")
             or first_difference(ours.channels, back.channels, "image channels")
             or first_difference(ours.others, back.others, "the towers' embed specs"))
    if found:
        key, value, nearest = found
        raise ConversionError(f"{family.name} cannot express {key}={value!r} (its config gives back {nearest!r})")
    return config
