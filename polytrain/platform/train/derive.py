"""A run's config completed from the checkpoints it starts from: what their own configs say about the parts they
fill, under the recipe's keys; a recipe key that contradicts them is an error naming both values.

``derived_config`` is step 2 of resolving a job (``polytrain.job``), before any process group.  It opens the
checkpoints ``finetune.init_from`` or ``finetune.init_parts`` name (their configs; the weights come later) and
takes from each of the other libraries', for the parts it fills:

- a stack (``backbone.encoder``, ``backbone.decoder``): its layers and block settings.  Two stacks from
  checkpoints with different blocks (a ViT encoder, a Llama decoder) keep the decoder's as ``model.backbone``
  and the encoder's differences as ``model.backbone.encoder``; a stack no checkpoint fills shares the blocks
  of the one that does;
- ``embedders.text``: the text embedder's settings, the output's tie and bias, and the tokenizer: the
  checkpoint's ``tokenizer.json`` becomes the run's, its special tokens ``tokenizers.text.bos``, ``eos``,
  ``pad`` and ``mask``, its positions ``tokenizers.text.max_len``;
- an image embedder: the patch embedding's settings and ``tokenizers.image`` (patch size, side, channels);
  a tower (``model.towers.<modality>``, the checkpoint read as one where the recipe takes it so): its
  architecture, and its preprocessing as the tokenizer's (``derive_towers``);
- ``lm_head``: the untied output; a classifier head: its pooling.

The recipe's own keys stay where a checkpoint says nothing (dropout, kernels, the new parts), and
``check_sources`` stops at the first that contradicts one.
polytrain's own checkpoints add nothing here (the recipe configures the model they fit), but the towers
``init_parts`` takes from them (``derive_towers.own_towers``: a stage-2 run continuing stage 1's projector).
"""

import logging
from functools import reduce
from typing import Any

import yaml

from polytrain.config import Config, build_config, merged
from polytrain.config.model import BLOCK_FIELDS, BackboneConfig
from polytrain.config.registries import POSITIONS
from polytrain.errors import ConfigError
from polytrain.models.convert.expressible import IMAGE_ONLY, TEXT_ONLY, essential_backbone
from polytrain.models.convert.family import Architecture
from polytrain.models.convert.timm_vit import patch_side
from polytrain.platform.train.derive_towers import fixed, own_towers, tower_settings
from polytrain.platform.train.sources import Source, open_sources

log = logging.getLogger(__name__)

STACKS = ("backbone.encoder", "backbone.decoder")


def derived_config(cfg: Config, tree: dict) -> tuple[Config, list[Source]]:
    """The recipe's config (``cfg``, read from ``tree``) completed from the checkpoints it starts from (another
    library's read as towers where the recipe takes them so), checked against them, and those checkpoints, opened."""
    sources = [source.reading_towers(set(cfg.model.towers)) for source in open_sources(cfg.finetune)]
    foreign = [source for source in sources if source.external is not None]
    towers = own_towers(sources)
    if foreign or towers:
        given = merged(towers, derived(cfg, foreign))
        for source in foreign:
            filled = ", ".join(source.filled(cfg.data.heads))
            log.info("%s is a %s checkpoint of %s", source.name, source.family, filled)
        log.info("the architecture from the checkpoints: %s", yaml.safe_dump(given, default_flow_style=True,
                                                                            width=float("inf")).strip())
        cfg = build_config(merged(given, tree))
    check_sources(cfg, sources)
    return cfg, sources


def derived(cfg: Config, sources: list[Source]) -> dict:
    """The config tree (``model``, ``tokenizers``) the checkpoints give, as defaults under the recipe's keys."""
    by_part = {part: source for source in sources for part in source.filled(cfg.data.heads)}
    tree: dict = {}
    for source in sources:
        if not source.parts:  # the whole checkpoint: a stack it lacks is absent (unless the recipe adds one)
            backbone = source.external.architecture.model.backbone
            for stack in ("encoder", "decoder"):
                if not getattr(backbone, f"{stack}_layers"):
                    put(tree, f"model.backbone.{stack}_layers", 0)
    for key, value in stack_settings(*(by_part.get(stack) for stack in STACKS)).items():
        put(tree, key, value)
    for part, source in by_part.items():
        for key, value in part_settings(part, source).items():
            put(tree, key, value)
    return tree


def stack_settings(encoder: Source | None, decoder: Source | None) -> dict[str, Any]:
    """The backbone keys the stacks' checkpoints give: the blocks of the decoder's (else the encoder's), each
    stack's layers, and the encoder's own block settings where they differ from the decoder's."""
    base = decoder or encoder
    if base is None:
        return {}
    backbone = base.external.architecture.model.backbone
    settings = {f"model.backbone.{name}": getattr(backbone, name) for name in BLOCK_FIELDS if name != "mlp_ratio"}
    for stack, source in (("encoder", encoder), ("decoder", decoder)):
        if source is not None:
            settings[f"model.backbone.{stack}_layers"] = getattr(source.external.architecture.model.backbone,
                                                                 f"{stack}_layers")
    if encoder is not None and decoder is not None:
        ours, theirs = (blocks(source.external.architecture.model.backbone) for source in (encoder, decoder))
        settings["model.backbone.encoder"] = {name: value for name, value in ours.items() if value != theirs[name]}
    return settings


def blocks(backbone: BackboneConfig) -> dict[str, Any]:
    """A stack's block settings, each spelled one way (so equal blocks compare equal)."""
    essential = essential_backbone(backbone)
    return {name: getattr(essential, name) for name in BLOCK_FIELDS}


def part_settings(part: str, source: Source) -> dict[str, Any]:
    """The config values (dotted keys) that taking ``part`` from ``source`` fixes (a stack's: ``stack_settings``)."""
    arch: Architecture = source.external.architecture
    model, embed = arch.model, arch.model.embed
    kind, _, which = part.partition(".")
    if part == "embedders.text":
        source.tokenizer_json()  # the run's tokenizer: it must be there
        names = dict(source.external.special)
        if names.get("pad") in (names.get("bos"), names.get("eos")):
            names.pop("pad")  # polytrain drops padding from the loss, so it keeps a pad token of its own
        if "pad" not in names and names.get("unk") not in (None, names.get("bos"), names.get("eos")):
            names["pad"] = names["unk"]  # a byte-level tokenizer's unknown token never occurs: it pads, no new row
        return {**{f"model.embed.{key}": getattr(embed, key) for key in ("modality_vector", *TEXT_ONLY)},
                "model.tie_embeddings": model.tie_embeddings, "model.lm_bias": model.lm_bias,
                "tokenizers.text.max_len": arch.spec.grid[1],
                **{f"tokenizers.text.{role}": names[role] for role in ("bos", "eos", "pad", "mask") if role in names}}
    if kind == "embedders" and which in model.towers:
        return tower_settings(source.external, which)
    if kind == "embedders":
        rows, cols = arch.spec.grid
        if rows != cols:
            raise ConfigError(source.key, str(source.path), f"its {rows}x{cols} patch grid is not square, and "
                              f"polytrain's {which} tokenizer makes square ones")
        side = patch_side(arch)
        return {**{f"model.embed.{key}": getattr(embed, key) for key in ("modality_vector", *IMAGE_ONLY)},
                f"tokenizers.{which}.patch_size": side, f"tokenizers.{which}.size": rows * side,
                f"tokenizers.{which}.channels": arch.channels}
    if part == "lm_head":
        return {"model.tie_embeddings": False, "model.lm_bias": model.lm_bias}
    if kind == "heads" and arch.head == "encoder_classifier":
        classifier = model.heads.classifier
        return {"model.heads.classifier.pooling": classifier.pooling,
                "model.heads.classifier.pooler": classifier.pooler}
    return {}


def put(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def check_sources(cfg: Config, sources: list[Source]) -> None:
    """Stop at the first setting of ``cfg`` that contradicts a checkpoint it starts from, naming both values."""
    heads = cfg.data.heads
    for source in sources:
        if source.external is None:
            continue  # polytrain's own: the recipe configures the model it fits
        for part in source.filled(heads):
            for key, theirs, ours in compared(cfg, part, source):
                if ours != theirs:
                    raise ConfigError(key, ours, f"contradicts {source.name}, a {source.family} checkpoint whose "
                                      f"config gives {theirs!r}")
        if "embedders.text" in source.filled(heads):
            check_text_tokenizer(cfg, source)


def compared(cfg: Config, part: str, source: Source) -> list[tuple[str, Any, Any]]:
    """(key, the checkpoint's value, the config's value) of every setting taking ``part`` from ``source`` fixes."""
    backbone = source.external.architecture.model.backbone
    if part in STACKS:
        stack = part.partition(".")[2]
        layers = f"{stack}_layers"
        own = cfg.model.backbone.encoder_stack if stack == "encoder" else cfg.model.backbone
        spelled = cfg.model.backbone.encoder if stack == "encoder" else {}
        ours, theirs = blocks(own), blocks(backbone)
        return [(f"model.backbone.{layers}", getattr(backbone, layers), getattr(cfg.model.backbone, layers))] + \
            [(f"model.backbone.{'encoder.' if name in spelled else ''}{name}", theirs[name], ours[name])
             for name in BLOCK_FIELDS]
    # the text tokenizer's names are defaults (its length: check_text_tokenizer); a tower's use is the recipe's
    return [(key, value, reduce(lookup, key.split("."), cfg)) for key, value in part_settings(part, source).items()
            if not key.startswith("tokenizers.text.") and fixed(key)]


def lookup(node: Any, name: str) -> Any:
    """A config section's field, or a mapping's entry (``model.towers.<modality>``)."""
    return node[name] if isinstance(node, dict) else getattr(node, name)


def check_text_tokenizer(cfg: Config, source: Source) -> None:
    """The run's text tokenizer is the checkpoint's, as long as its position table is (or longer, without one)."""
    text = cfg.tokenizers.text
    if text.path:
        raise ConfigError("tokenizers.text.path", text.path, f"the text embedder comes from {source.name}, whose "
                          "tokenizer.json gives its rows; leave tokenizers.text.path unset")
    positions = source.external.architecture.spec.grid[1]
    learned = POSITIONS.get(cfg.model.backbone.position).table == "learned"
    if text.max_len > positions or (learned and text.max_len != positions):
        raise ConfigError("tokenizers.text.max_len", text.max_len, f"contradicts {source.name}, a {source.family} "
                          f"checkpoint of {positions} positions" + (" (a learned table of them)" if learned else ""))
