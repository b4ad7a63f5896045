"""Hugging Face ``CLIPVisionModel``, ``SiglipVisionModel`` (or the vision side of ``CLIPModel``, ``SiglipModel``)
-> polytrain image towers; their vision configs and tensors are also LLaVA's (``hf_llava``).

Both are pre-norm ViTs with separate q, k, v projections (stacked into
polytrain's one) and learned positions.  CLIP has a class token whose
position is the table's first row, a norm before the blocks (``pre_layrnorm``),
no patch bias, QuickGELU and eps 1e-5; its ``post_layernorm`` normalizes the
pooled class token only, never the tokens a tower passes on, so the tower
reads no final norm and the tensor is dropped.  SigLIP has no class token, a
patch bias, tanh-GELU and eps 1e-6; its ``post_layernorm`` normalizes every
token (the tower's final norm) and its attention-pool head is not read.

Tensor names are read in the hub's layout (``vision_model.`` before the
vision model's own names, as ``transformers`` 4 saved them) and in the one
``transformers`` 5 saves (without it).

Shape legend: E width, C channels, p patch side.
"""

import torch
from torch import Tensor

from polytrain.config.tower import TowerConfig
from polytrain.models.convert.family import (
    Architecture,
    HFFamily,
    hf_activation_to_mlp,
    mlp_to_hf_activation,
    tower_unread,
)
from polytrain.models.convert.rules import ConversionError, Rule, reshaped, same, stacked
from polytrain.models.convert.timm_vit import patch_side, tower_architecture, triple
from polytrain.tokens import EmbedSpec

DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
                 patch_size=32, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}
"""``CLIPVisionConfig``'s and ``SiglipVisionConfig``'s defaults, for config files that leave keys out."""
VISION_MODEL_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
"""A vision config's ``model_type`` -> its kind."""
MEAN_STD = {"clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
            "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
"""Each kind's image processor's mean and std, where no ``preprocessor_config.json`` says."""
RESAMPLE = {2: "bilinear", 3: "bicubic"}
"""PIL's resampling filters (an image processor's ``resample``) polytrain's image tokenizer has."""


def tower_of(vision: dict, kind: str, source: str) -> TowerConfig:
    """The image tower of a CLIP or SigLIP vision config (its features as the vision model's
    ``last_hidden_state``: CLIP's un-normalized, SigLIP's through ``post_layernorm``)."""
    c = {**DEFAULTS[kind], **vision}
    if c["image_size"] % c["patch_size"]:
        raise ConversionError(f"{source} config image_size={c['image_size']} is not a whole number of "
                              f"patch_size={c['patch_size']} patches")
    clip = kind == "clip"
    return TowerConfig(dim=c["hidden_size"], layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                       mlp_width=c["intermediate_size"],
                       mlp=hf_activation_to_mlp(c["hidden_act"], "hidden_act", source),
                       norm_eps=c["layer_norm_eps"], patch_bias=not clip, input_norm=clip, cls_token=clip,
                       positions=c["image_size"] // c["patch_size"], final_norm=not clip, projector="none")


def image_spec(vision: dict, kind: str) -> EmbedSpec:
    c = {**DEFAULTS[kind], **vision}
    side = c["image_size"] // c["patch_size"]
    return EmbedSpec("image", c["num_channels"] * c["patch_size"] ** 2, (side, side))


def vision_settings(tower: TowerConfig, spec: EmbedSpec, channels: int, kind: str, source: str) -> dict:
    """The vision config of ``tower``, as it is built (blocks up to its selected layer); what the class cannot
    hold (registers, LayerScale, its norms otherwise placed) is left for the round trip to name."""
    side = round((spec.input_dim / channels) ** 0.5)
    settings = dict(model_type=next(t for t, k in VISION_MODEL_TYPES.items() if k == kind), hidden_size=tower.dim,
                    intermediate_size=tower.mlp_hidden, num_hidden_layers=tower.built_layers,
                    num_attention_heads=tower.n_heads, image_size=(tower.positions or spec.grid[0]) * side,
                    patch_size=side, num_channels=channels, layer_norm_eps=tower.norm_eps, attention_dropout=0.0,
                    hidden_act="gelu_pytorch_tanh" if tower.mlp == "gelu_tanh" else mlp_to_hf_activation(tower.mlp,
                                                                                                         source))
    return {**settings, "vision_use_head": False} if kind == "siglip" else settings


def vision_rules(arch: Architecture, theirs: str, ours: str = "embedders.image.tower") -> list[Rule]:
    """The tensors of a CLIP or SigLIP vision model under ``theirs`` (``vision_model.``) <-> ``arch``'s image
    tower."""
    tower, side, e = arch.model.towers["image"], patch_side(arch), f"{theirs}embeddings"
    rules = [reshaped(f"{ours}.stem.proj.weight", f"{e}.patch_embedding.weight", lambda t: (t.shape[0], -1),
                      lambda w_EK: (w_EK.shape[0], arch.channels, side, side)),
             same(f"{ours}.stem.position.table", f"{e}.position_embedding.weight")]
    if tower.patch_bias:
        rules.append(same(f"{ours}.stem.proj.bias", f"{e}.patch_embedding.bias"))
    if tower.cls_token:
        rules.append(reshaped(f"{ours}.stem.cls", f"{e}.class_embedding", lambda t: (1, -1), lambda t: (-1,)))
    norms = [("input_norm", "pre_layrnorm")] * tower.input_norm + [("norm", "post_layernorm")] * tower.final_norm
    rules += [same(f"{ours}.{o}.{kind}", f"{theirs}{t}.{kind}") for o, t in norms for kind in ("weight", "bias")]
    pairs = [("attn_norm", "layer_norm1"), ("attn.out", "self_attn.out_proj"), ("mlp_norm", "layer_norm2"),
             ("mlp.fc", "mlp.fc1"), ("mlp.proj", "mlp.fc2")]
    for i in range(tower.built_layers):
        block, layer = f"{ours}.blocks.{i}", f"{theirs}encoder.layers.{i}"
        for kind in ("weight", "bias"):
            rules += [same(f"{block}.{o}.{kind}", f"{layer}.{t}.{kind}") for o, t in pairs]
            rules.append(stacked(f"{block}.attn.qkv.{kind}",
                                 tuple(f"{layer}.self_attn.{p}_proj.{kind}" for p in "qkv")))
    return rules


def vision_unread(tower: TowerConfig, theirs: str) -> str:
    """Regex of a vision model's tensors ``tower`` does not read: blocks after its selected layer, the final norm
    where it reads none, SigLIP's head."""
    prefix = theirs.replace(".", r"\.")
    parts = tower_unread(tower, f"{prefix}encoder\\.layers\\.", f"{prefix}post_layernorm")
    return "|".join([*parts, f"^{prefix}head\\."])


def identity_norm(tower: TowerConfig, theirs: str) -> dict[str, Tensor]:
    """The vision model's ``post_layernorm`` where ``tower`` reads none: the library's class holds it anyway."""
    if tower.final_norm:
        return {}
    return {f"{theirs}post_layernorm.weight": torch.ones(tower.dim),
            f"{theirs}post_layernorm.bias": torch.zeros(tower.dim)}


def image_preprocessing(vision: dict, preprocessor: dict, kind: str) -> dict:
    """The image tokenizer's settings of a CLIP or SigLIP checkpoint: its processor's resize, crop, mean and std
    (each kind's defaults without a ``preprocessor_config.json``)."""
    c = {**DEFAULTS[kind], **vision}
    mean, std = MEAN_STD[kind]
    image = dict(size=c["image_size"], patch_size=c["patch_size"], channels=c["num_channels"],
                 mean=triple(preprocessor.get("image_mean", mean)), std=triple(preprocessor.get("image_std", std)),
                 interpolation=RESAMPLE.get(preprocessor.get("resample", 3), "bicubic"),
                 resize="crop" if kind == "clip" else "stretch")
    if "do_center_crop" in preprocessor:
        image["resize"] = "crop" if preprocessor["do_center_crop"] else "stretch"
    if image["resize"] == "crop" and "crop_size" in preprocessor:
        crop, edge = preprocessor["crop_size"]["height"], preprocessor.get("size", {}).get("shortest_edge")
        image.update(size=crop, crop_pct=crop / edge if edge else 1.0)
    elif "size" in preprocessor and "height" in preprocessor["size"]:
        image["size"] = preprocessor["size"]["height"]
    return image


class VisionModel(HFFamily):
    """A CLIP or SigLIP vision model (``full``: the two-tower model, its vision side taken) as an image tower."""

    modality, head, base_prefix = "image", "", "vision_model."
    unused = r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$|logit_bias$)"

    def __init__(self, name: str, model_type: str, kind: str, full: bool):
        self.name, self.model_type, self.kind, self.full = name, model_type, kind, full

    def vision(self, config: dict) -> dict:
        return (config.get("vision_config") or {}) if self.full else config

    def architecture(self, config: dict) -> Architecture:
        vision = self.vision(config)
        tower = tower_of(vision, self.kind, self.name)
        channels = {**DEFAULTS[self.kind], **vision}["num_channels"]
        return tower_architecture(tower, image_spec(vision, self.kind), channels)

    def preprocessing(self, config: dict, preprocessor: dict) -> dict:
        return {"image": image_preprocessing(self.vision(config), preprocessor, self.kind)}

    def unread(self, arch: Architecture) -> str:
        return vision_unread(arch.model.towers["image"], self.base_prefix)

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        return vision_rules(arch, self.base_prefix)

    def settings(self, arch: Architecture) -> dict:
        raise ConversionError(f"{self.name} is written inside a LlavaForConditionalGeneration, not alone")


CLIP_VISION = VisionModel("CLIPVisionModel", "clip_vision_model", "clip", full=False)
CLIP = VisionModel("CLIPModel", "clip", "clip", full=True)
SIGLIP_VISION = VisionModel("SiglipVisionModel", "siglip_vision_model", "siglip", full=False)
SIGLIP = VisionModel("SiglipModel", "siglip", "siglip", full=True)
