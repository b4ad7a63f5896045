"""Named model presets, known without importing torch: what ``model.preset`` starts from.

A recipe's ``model.preset: decoder_1b`` takes that preset's ``ModelConfig``
as the defaults of its model section, under the keys the recipe sets itself
(``model.backbone.decoder_layers: 4``).  The family functions configure
polytrain like those models at any size; each named preset also says which
modalities and heads it is sized and counted with (``polytrain model info``,
``models/presets.py``).
"""

from dataclasses import dataclass, field
from typing import NamedTuple

from polytrain.config.model import BackboneConfig, ClassifierConfig, EmbedConfig, HeadsConfig, ModelConfig

LLM_VOCAB = 32000
"""Text vocabulary the generic presets are counted with (Llama 2's)."""



class Spec(NamedTuple):
    """What a preset's embedder of one modality is sized for, as ``tokens.EmbedSpec`` takes it."""

    modality: str
    input_dim: int
    """Vocabulary (text) or features per patch."""
    grid: tuple[int, int]
    """Positions: (1, max length) for text, the patch grid for images."""


IMAGE_224_16 = Spec("image", 3 * 16 * 16, (14, 14))
"""224x224 RGB images in 16x16 patches."""


@dataclass(frozen=True)
class Preset:
    about: str
    model: ModelConfig
    specs: tuple[Spec, ...]
    """Modalities (vocabulary, grids) the embedders are sized for."""
    task_heads: dict[str, str] = field(default_factory=dict)
    """Tasks and their heads, as in ``data.tasks``."""


def encoder_decoder(dim: int, heads: int, layers: int) -> ModelConfig:
    """The default block (pre-norm LayerNorm, GELU, learned positions) with ``layers`` in each stack."""
    return ModelConfig(backbone=BackboneConfig(dim=dim, n_heads=heads, encoder_layers=layers, decoder_layers=layers))


def llama(dim: int, layers: int, heads: int, kv_heads: int, hidden: int) -> ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases, untied output."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, n_kv_heads=kv_heads, encoder_layers=0, decoder_layers=layers,
                              mlp_ratio=hidden / dim, mlp="swiglu", norm="rmsnorm", bias=False, position="rope")
    return ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False), tie_embeddings=False)


def vit(dim: int, depth: int, heads: int, classes: int = 1000) -> ModelConfig:
    """timm's ``VisionTransformer`` (class token, raster positions, LN eps 1e-6) as an encoder classifier."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, encoder_layers=depth, decoder_layers=0, norm_eps=1e-6)
    return ModelConfig(backbone=backbone,
                       embed=EmbedConfig(modality_vector=False, patch_positions="raster", cls_token=True),
                       heads=HeadsConfig(classifier=ClassifierConfig(classes=classes, pooling="cls")))


def gpt2(dim: int, layers: int, heads: int, eps: float = 1e-5) -> ModelConfig:
    """Hugging Face ``GPT2LMHeadModel``: pre-norm, tanh-GELU, learned positions, output tied to the embedding."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, encoder_layers=0, decoder_layers=layers, mlp="gelu_tanh",
                              norm_eps=eps)
    return ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False))


def bart(dim: int, encoder_layers: int, decoder_layers: int, heads: int, ffn: int,
         scale_embedding: bool = False) -> ModelConfig:
    """Hugging Face ``BartForConditionalGeneration``: post-norm, embedding LayerNorm, GELU, tied output."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                              mlp_ratio=ffn / dim, norm_position="post", embed_norm=True)
    return ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False, scale_tokens=scale_embedding))


ENCODER_DECODER = ((Spec("text", LLM_VOCAB, (1, 512)), IMAGE_224_16), {"caption": "encoder_decoder",
                                                                      "lm": "decoder_only"})
CLASSIFIER = ((IMAGE_224_16,), {"classify": "encoder_classifier"})
TINY = Preset("ViT-Ti width, 4 + 4 layers", encoder_decoder(192, 3, 4), *ENCODER_DECODER)
SMALL = Preset("T5-small depth, ViT-S width, 6 + 6 layers", encoder_decoder(384, 6, 6), *ENCODER_DECODER)
BASE = Preset("T5-base / ViT-B shape, 12 + 12 layers", encoder_decoder(768, 12, 12), *ENCODER_DECODER)
LARGE = Preset("T5-large / ViT-L shape, 24 + 24 layers", encoder_decoder(1024, 16, 24), *ENCODER_DECODER)
DECODER_1B = Preset("~1.1B Llama-style decoder (TinyLlama shape), seq 2048", llama(2048, 22, 32, 4, 5632),
                    (Spec("text", LLM_VOCAB, (1, 2048)),), {"lm": "decoder_only"})
VIT_TINY_PATCH16_224 = Preset("timm vit_tiny_patch16_224", vit(192, 12, 3), *CLASSIFIER)
VIT_BASE_PATCH16_224 = Preset("timm vit_base_patch16_224", vit(768, 12, 12), *CLASSIFIER)
GPT2 = Preset("Hugging Face gpt2 (124M)", gpt2(768, 12, 12), (Spec("text", 50257, (1, 1024)),),
              {"lm": "decoder_only"})
BART_BASE = Preset("Hugging Face facebook/bart-base (140M)", bart(768, 6, 6, 12, 3072),
                   (Spec("text", 50265, (1, 1024)),), {"translate": "encoder_decoder"})
"""The named presets (``config.registries.PRESETS``)."""
