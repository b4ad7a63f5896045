"""The model sections of the named presets, known without importing torch: what ``model.preset`` starts from.

A recipe's ``model.preset: decoder_1b`` takes that preset's ``ModelConfig``
as the defaults of its model section, under the keys the recipe sets itself
(``model.backbone.decoder_layers: 4``).  The family functions configure
polytrain like those models at any size; ``presets.py`` pairs each named one
with the modalities it is sized for and counts its parameters.
"""

from polytrain.models.config import BackboneConfig, ClassifierConfig, EmbedConfig, HeadsConfig, ModelConfig
from polytrain.registry import Registry

MODEL_PRESETS: Registry[ModelConfig] = Registry("model preset")


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


def bert(dim: int, layers: int, heads: int, eps: float = 1e-12) -> ModelConfig:
    """Hugging Face ``BertForMaskedLM``: post-norm, a LayerNorm over the summed embeddings, erf-GELU, a token-type
    table, the output tied to the embedding with a bias of its own."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, encoder_layers=layers, decoder_layers=0, norm_eps=eps,
                              norm_position="post", embed_norm=True)
    return ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False, token_types=2), lm_bias=True)


def bart(dim: int, encoder_layers: int, decoder_layers: int, heads: int, ffn: int,
         scale_embedding: bool = False) -> ModelConfig:
    """Hugging Face ``BartForConditionalGeneration``: post-norm, embedding LayerNorm, GELU, tied output."""
    backbone = BackboneConfig(dim=dim, n_heads=heads, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                              mlp_ratio=ffn / dim, norm_position="post", embed_norm=True)
    return ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False, scale_tokens=scale_embedding))


MODEL_PRESETS.register("tiny")(encoder_decoder(192, 3, 4))
MODEL_PRESETS.register("small")(encoder_decoder(384, 6, 6))
MODEL_PRESETS.register("base")(encoder_decoder(768, 12, 12))
MODEL_PRESETS.register("large")(encoder_decoder(1024, 16, 24))
MODEL_PRESETS.register("decoder_1b")(llama(2048, 22, 32, 4, 5632))
MODEL_PRESETS.register("vit_tiny_patch16_224")(vit(192, 12, 3))
MODEL_PRESETS.register("vit_base_patch16_224")(vit(768, 12, 12))
MODEL_PRESETS.register("gpt2")(gpt2(768, 12, 12))
MODEL_PRESETS.register("bert_base")(bert(768, 12, 12))
MODEL_PRESETS.register("bart_base")(bart(768, 6, 6, 12, 3072))
