"""Named model presets: a config, the modalities it is sized for, and the heads it is counted with.

``polytrain model info NAME`` prints a preset's parameter counts; a recipe starts its model section from one
with ``model.preset: NAME``.  The model sections live in ``preset_configs`` (torch-free, so a recipe is read
without torch); the family functions here (``llama``, ``gpt2``) size them for the benchmarks and tests.
A checkpoint's own config gives its architecture through ``polytrain.models.convert``.
"""

from dataclasses import dataclass, field, replace

import torch

from polytrain.models import preset_configs
from polytrain.models.config import ModelConfig
from polytrain.models.model import PolyModel
from polytrain.models.preset_configs import MODEL_PRESETS
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


def named(name: str, about: str, specs: tuple[EmbedSpec, ...], task_heads: dict[str, str]) -> None:
    """Register preset ``name``: the model section of that name in ``MODEL_PRESETS``, sized for ``specs``."""
    PRESETS.register(name)(Preset(about, MODEL_PRESETS.get(name), specs, task_heads))


ENCODER_DECODER = ((EmbedSpec("text", LLM_VOCAB, (1, 512)), IMAGE_224_16), {"caption": "encoder_decoder",
                                                                          "lm": "decoder_only"})
named("tiny", "ViT-Ti width, 4 + 4 layers", *ENCODER_DECODER)
named("small", "T5-small depth, ViT-S width, 6 + 6 layers", *ENCODER_DECODER)
named("base", "T5-base / ViT-B shape, 12 + 12 layers", *ENCODER_DECODER)
named("large", "T5-large / ViT-L shape, 24 + 24 layers", *ENCODER_DECODER)
named("decoder_1b", "~1.1B Llama-style decoder (TinyLlama shape), seq 2048", (EmbedSpec("text", LLM_VOCAB, (1, 2048)),),
      {"lm": "decoder_only"})
named("vit_tiny_patch16_224", "timm vit_tiny_patch16_224", (IMAGE_224_16,), {"classify": "encoder_classifier"})
named("vit_base_patch16_224", "timm vit_base_patch16_224", (IMAGE_224_16,), {"classify": "encoder_classifier"})
named("gpt2", "Hugging Face gpt2 (124M)", (EmbedSpec("text", 50257, (1, 1024)),), {"lm": "decoder_only"})
named("bert_base", "Hugging Face bert-base-uncased (110M) as a masked LM", (EmbedSpec("text", 30522, (1, 512)),),
      {"mlm": "masked_lm"})
named("bart_base", "Hugging Face facebook/bart-base (140M)", (EmbedSpec("text", 50265, (1, 1024)),),
      {"translate": "encoder_decoder"})


def llama(about: str, dim: int, layers: int, heads: int, kv_heads: int, hidden: int, vocab: int,
          max_len: int) -> Preset:
    """``preset_configs.llama`` at any size, sized for a ``vocab``-token text of ``max_len``."""
    return Preset(about, preset_configs.llama(dim, layers, heads, kv_heads, hidden),
                  (EmbedSpec("text", vocab, (1, max_len)),), {"lm": "decoder_only"})


def gpt2(about: str, dim: int, layers: int, heads: int, vocab: int = 50257, positions: int = 1024,
         eps: float = 1e-5) -> Preset:
    """``preset_configs.gpt2`` at any size, sized for a ``vocab``-token text of ``positions``."""
    return Preset(about, preset_configs.gpt2(dim, layers, heads, eps), (EmbedSpec("text", vocab, (1, positions)),),
                  {"lm": "decoder_only"})


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
