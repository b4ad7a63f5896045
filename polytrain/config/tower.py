"""A modality's tower, configured without importing torch: ``model.towers.<modality>``.

A tower is a modality's embedder with an encoder of its own in front of the
backbone: LLaVA's vision tower (a CLIP, SigLIP or DINOv2 ViT), Qwen-Audio's
Whisper encoder.  It is a stem (a ViT's patch projection with its class and
register tokens and learned positions; Whisper's two 1-D convolutions over
log-mel frames and its position table), an encoder stack of its own width,
depth, heads, norm and MLP, a feature selection (which layer's output, the
class token kept or not) and a projector into the backbone's width.  Its
output takes the place of the plain patch embedder's: a span's vectors in a
``decoder_only`` sequence, the memory of an ``encoder_decoder`` (with no
encoder stack of the backbone's, the tower is the encoder: Whisper), the input
of an ``encoder_classifier``.

One input token gives one output vector, so the data layer's span lengths hold:
an image token is a patch (the class and register tokens live inside the tower
and are dropped from its output unless ``keep_cls``), an audio token holds two
consecutive mel frames (the stride-2 convolution gives one vector per token).

The fields split in two: what a checkpoint fixes (``ARCHITECTURE``: its
widths, depth, norms, tokens, positions) and how a run uses it (feature layer,
class token, final norm, projector), which the recipe chooses.
"""

from dataclasses import dataclass, fields
from typing import Annotated, Literal

from polytrain.config.registries import MLPS, NORMS
from polytrain.errors import ConfigError
from polytrain.schema import Fraction, NonNegative, Positive, Range

USE = ("feature_layer", "keep_cls", "final_norm", "projector", "projector_bias", "dropout")
"""The fields of how a run uses a tower; the others (``ARCHITECTURE``) are what its checkpoint fixes."""


@dataclass(frozen=True)
class TowerConfig:
    stem: Literal["patch", "conv"] = "patch"
    """patch: a ViT's stem, one linear map of each patch's pixels (its patch convolution), learned positions on the
    patch grid; conv: Whisper's, two 1-D convolutions of kernel 3 with GELU over the log-mel frames, the second of
    stride 2 (one vector per audio token of 2 frames; the audio tokenizer must cut tokens of ``n_mels`` x 2), then
    a position table over time initialized with Whisper's sinusoids."""
    dim: Positive[int] = 192
    """Width of the tower's own token vectors."""
    layers: NonNegative[int] = 4
    """Encoder blocks of the tower (a checkpoint's depth). Only those up to ``feature_layer`` are built: a block
    after the selected one computes nothing the model reads."""
    n_heads: Positive[int] = 3
    """Attention heads of each block; must divide ``dim``."""
    mlp_width: Annotated[int, Range(ge=0, note="0: 4 x dim")] = 0
    """MLP hidden width in channels (0: 4 x dim)."""
    mlp: str = "gelu"
    """MLP kind: gelu, gelu_tanh, quick_gelu (OpenAI CLIP's x * sigmoid(1.702 x)), relu, swiglu."""
    norm: str = "layernorm"
    """Normalization: layernorm or rmsnorm."""
    norm_eps: Positive[float] = 1e-6
    """Epsilon of every norm of the tower (timm's ViTs and SigLIP: 1e-6; CLIP and Whisper: 1e-5)."""
    bias: bool = True
    """Biases in the attention and MLP projections."""
    patch_bias: bool = True
    """patch: a bias in the patch projection (CLIP has none)."""
    input_norm: bool = False
    """A norm over the stem's output before the first block (CLIP's ``ln_pre``, timm's ``norm_pre``)."""
    layer_scale: bool = False
    """Each block scales its residual branches by a learned per-channel vector (DINOv2's LayerScale)."""
    cls_token: bool = True
    """patch: a learned class token before the patches (CLIP, DINOv2; SigLIP has none)."""
    registers: NonNegative[int] = 0
    """patch: learned register tokens after the class token (DINOv2 with registers); never in the output."""
    prefix_positions: bool = True
    """patch: the position table has rows for the class and register tokens before the patches' (timm's
    ``no_embed_class=False``); false: for the patches only."""
    positions: Annotated[int, Range(ge=0, note="0: the tokenizer's largest")] = 0
    """patch: patches per side of the learned position grid (a checkpoint's image side / patch), bicubically
    interpolated for other grids; conv: rows of the position table, one per audio token (Whisper's 1500: 30 s).
    0: the modality tokenizer's largest grid."""
    feature_layer: int = -1
    """Whose output the projector reads, counted as Hugging Face's ``hidden_states``: 0 the stem's output (after
    ``input_norm``), k the k-th block's, negative from the end: -1 the last block's, -2 the one before (LLaVA)."""
    keep_cls: bool = False
    """Keep the class token in the output, first (LLaVA's ``full`` feature selection); only where no span is laid
    out for it (an encoder's input, not an image span in a decoder's text). Registers are always dropped."""
    final_norm: bool = True
    """Normalize the selected features with the tower's final norm (timm's ``norm``, SigLIP's ``post_layernorm``,
    Whisper's ``layer_norm``); LLaVA reads un-normalized hidden states (false)."""
    projector: Literal["none", "linear", "mlp2x_gelu"] = "mlp2x_gelu"
    """Into the backbone's width: none (the widths must match: Whisper's decoder reads its encoder directly), one
    linear map, or LLaVA-1.5's two-layer MLP with GELU (``linear_1``, GELU, ``linear_2``)."""
    projector_bias: bool = True
    """Biases in the projector's linear maps."""
    dropout: Fraction = 0.0
    """Dropout on attention weights and residual branches inside the tower, during training only."""

    def check(self) -> None:
        """Its own settings; its MLP and norm names and its width are checked with the model's (``check_tower``)."""
        if self.dim % self.n_heads:
            raise ConfigError("n_heads", self.n_heads, f"must divide dim={self.dim}")
        if not -(self.layers + 1) <= self.feature_layer <= self.layers:
            raise ConfigError("feature_layer", self.feature_layer, f"must be in -{self.layers + 1}..{self.layers} "
                              f"(layers={self.layers}: 0 the stem's output, k the k-th block's, -1 the last's)")
        if self.stem == "conv" and (self.cls_token or self.registers):
            raise ConfigError("cls_token", self.cls_token, "a conv stem (Whisper's) has no class or register "
                              "tokens; set cls_token: false, registers: 0")
        if self.keep_cls and not self.cls_token:
            raise ConfigError("keep_cls", True, "needs a class token (cls_token: true)")

    @property
    def built_layers(self) -> int:
        """The blocks the tower builds: those up to the selected one."""
        return self.feature_layer if self.feature_layer >= 0 else self.layers + 1 + self.feature_layer

    @property
    def prefix_tokens(self) -> int:
        """Tokens the tower puts before the patches: the class token and the registers."""
        return int(self.cls_token) + self.registers

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_width or 4 * self.dim


ARCHITECTURE = tuple(f.name for f in fields(TowerConfig) if f.name not in USE)
"""The fields a tower's checkpoint fixes."""


def check_tower(modality: str, tower: TowerConfig, width: int) -> None:
    """A tower has known MLP and norm kinds and a width to project to (``width``: the backbone's, the encoder
    stack's where it has its own); errors name the key under ``model``."""
    key = f"towers.{modality}"
    for name, registry in (("mlp", MLPS), ("norm", NORMS)):
        if getattr(tower, name) not in registry:
            raise ConfigError(f"{key}.{name}", getattr(tower, name), f"unknown; known: {', '.join(registry.names())}")
    if modality == "text":
        raise ConfigError(key, "...", "text is embedded by its token table; towers serve image, audio and plugin "
                          "modalities")
    if tower.projector == "none" and tower.dim != width:
        raise ConfigError(f"{key}.projector", "none", f"needs the tower's dim={tower.dim} to equal the backbone's "
                          f"width {width}; use linear or mlp2x_gelu")


def check_towers_data(towers: dict[str, TowerConfig], tokenizers, spans: dict[str, tuple[str, ...]]) -> None:
    """What a tower needs of the rest of the run: a tokenizer cutting its tokens, no kept class token where a
    span is laid out.  ``tokenizers``: the tokenizers section; ``spans``: the modalities each task lays out as
    spans of one slot per token (a decoder_only task's)."""
    for modality, tower in towers.items():
        key = f"model.towers.{modality}"
        if tower.stem == "conv":
            check_conv_tokenizer(key, getattr(tokenizers, modality, None), modality)
        for name, modalities in spans.items():
            if tower.keep_cls and modality in modalities:
                raise ConfigError(f"{key}.keep_cls", True, f"task {name!r} lays out {modality} spans of one slot "
                                  "per token, which have no slot for the class token; keep_cls: false")


def check_conv_tokenizer(key: str, audio, modality: str) -> None:
    """A conv stem reads tokens of two whole log-mel frames: the audio tokenizer's patches must be that."""
    if audio is None or not hasattr(audio, "patch_frames"):
        raise ConfigError(f"{key}.stem", "conv", f"reads log-mel frames, which the {modality} tokenizer does not "
                          "cut; conv stems serve the audio tokenizer")
    wanted = {"patch_frames": 2, "patch_mels": audio.n_mels, "stride_frames": 0, "stride_mels": 0}
    for name, value in wanted.items():
        if getattr(audio, name) != value:
            raise ConfigError(f"tokenizers.{modality}.{name}", getattr(audio, name), f"must be {value}: {key} has a "
                              f"conv stem, which reads tokens of 2 whole frames of n_mels={audio.n_mels} bins")
