"""Named model presets: a config, the modalities it is sized for, and the heads it is counted with.

``polytrain model info NAME`` prints a preset's parameter counts.  The family
functions (``vit``, ``gpt2``, ``bart``) also configure polytrain like those
models at any size, for the benchmarks and tests; a checkpoint's own config
gives its architecture through ``polytrain.models.convert``.
"""

from dataclasses import dataclass, field, replace

import torch

from polytrain.models.config import BackboneConfig, ClassifierConfig, EmbedConfig, HeadsConfig, ModelConfig
from polytrain.models.model import PolyModel
from polytrain.registry import Registry
from polytrain.tokens import EmbedSpec

LLM_VOCAB = 32000
"""Text vocabulary the generic presets are counted with (Llama 2's)."""
IMAGE_224_16 = EmbedSpec("image", 3 * 16 * 16, (14, 14))
"""224x224 RGB images in 16x16 patches."""


@dataclass(frozen=True)
class Preset:
    about: str
    model: ModelConfig
    specs: tuple[EmbedSpec, ...]
    """Modalities (vocabulary, grids) the embedders are sized for."""
    task_heads: dict[str, str] = field(default_factory=dict)
    """Tasks and their heads, as in ``data.tasks``."""

    def build(self, device: str | torch.device = "cpu") -> PolyModel:
        """The model; on ``"meta"`` it has shapes but no storage (for counting)."""
        with torch.device(device):
            return PolyModel(self.model, list(self.specs), self.task_heads)


PRESETS: Registry[Preset] = Registry("model preset")


def encoder_decoder(about: str, dim: int, heads: int, layers: int) -> Preset:
    """The default block (pre-norm LayerNorm, GELU, learned positions) with ``layers`` in each stack."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, encoder_layers=layers, decoder_layers=layers)
    specs = (EmbedSpec("text", LLM_VOCAB, (1, 512)), IMAGE_224_16)
    return Preset(about, ModelConfig(backbone=backbone), specs, {"caption": "encoder_decoder", "lm": "decoder_only"})


PRESETS.register("tiny")(encoder_decoder("ViT-Ti width, 4 + 4 layers", 192, 3, 4))
PRESETS.register("small")(encoder_decoder("T5-small depth, ViT-S width, 6 + 6 layers", 384, 6, 6))
PRESETS.register("base")(encoder_decoder("T5-base / ViT-B shape, 12 + 12 layers", 768, 12, 12))
PRESETS.register("large")(encoder_decoder("T5-large / ViT-L shape, 24 + 24 layers", 1024, 16, 24))


def llama(about: str, dim: int, layers: int, heads: int, kv_heads: int, hidden: int, vocab: int,
          max_len: int) -> Preset:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, untied output."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, n_kv_heads=kv_heads, encoder_layers=0, decoder_layers=layers,
                              mlp_ratio=hidden / dim, mlp="swiglu", norm="rmsnorm", bias=False, position="rope")
    model = ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False), tie_embeddings=False)
    return Preset(about, model, (EmbedSpec("text", vocab, (1, max_len)),), {"lm": "decoder_only"})


PRESETS.register("decoder_1b")(llama("~1.1B Llama-style decoder (TinyLlama shape), seq 2048",
                                     2048, 22, 32, 4, 5632, LLM_VOCAB, 2048))


def vit(about: str, dim: int, depth: int, heads: int, classes: int = 1000, image: EmbedSpec = IMAGE_224_16) -> Preset:
    """timm's ``VisionTransformer`` (class token, raster positions, LN eps 1e-6) as an encoder classifier."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, encoder_layers=depth, decoder_layers=0, norm_eps=1e-6)
    model = ModelConfig(backbone=backbone,
                        embed=EmbedConfig(modality_vector=False, patch_positions="raster", cls_token=True),
                        heads=HeadsConfig(classifier=ClassifierConfig(classes=classes, pooling="cls")))
    return Preset(about, model, (image,), {"classify": "encoder_classifier"})


PRESETS.register("vit_tiny_patch16_224")(vit("timm vit_tiny_patch16_224", 192, 12, 3))
PRESETS.register("vit_base_patch16_224")(vit("timm vit_base_patch16_224", 768, 12, 12))


def gpt2(about: str, dim: int, layers: int, heads: int, vocab: int = 50257, positions: int = 1024,
         eps: float = 1e-5) -> Preset:
    """Hugging Face ``GPT2LMHeadModel``: pre-norm, tanh-GELU, learned positions, output tied to the embedding."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, encoder_layers=0, decoder_layers=layers, mlp="gelu_tanh",
                              norm_eps=eps)
    model = ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False))
    return Preset(about, model, (EmbedSpec("text", vocab, (1, positions)),), {"lm": "decoder_only"})


PRESETS.register("gpt2")(gpt2("Hugging Face gpt2 (124M)", 768, 12, 12))


def bart(about: str, dim: int, encoder_layers: int, decoder_layers: int, heads: int, ffn: int, vocab: int = 50265,
         positions: int = 1024, scale_embedding: bool = False) -> Preset:
    """Hugging Face ``BartForConditionalGeneration``: post-norm, embedding LayerNorm, GELU, tied output."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                              mlp_ratio=ffn / dim, norm_position="post", embed_norm=True)
    model = ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False, scale_tokens=scale_embedding))
    return Preset(about, model, (EmbedSpec("text", vocab, (1, positions)),), {"translate": "encoder_decoder"})


PRESETS.register("bart_base")(bart("Hugging Face facebook/bart-base (140M)", 768, 6, 6, 12, 3072))


def with_backbone(preset: Preset, **changes) -> Preset:
    """``preset`` with some backbone fields changed (e.g. attention kernel, checkpointing)."""
    return replace(preset, model=replace(preset.model, backbone=replace(preset.model.backbone, **changes)))


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per part (embedders, encoder, decoder, lm_head, heads) and in total; tied weights once."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        part = ".".join(parts[:2]) if parts[0] in ("backbone", "embedders", "heads") else parts[0]
        counts[part] = counts.get(part, 0) + param.numel()
    counts["total"] = sum(counts.values())
    return counts
