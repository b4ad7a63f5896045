"""A named preset (``config.presets``) as a model, and its parameter counts (``polytrain model info``)."""

import torch

from polytrain.config.presets import Preset
from polytrain.models.model import PolyModel
from polytrain.tokens import EmbedSpec


def build(preset: Preset, device: str | torch.device = "cpu") -> PolyModel:
    """The preset's model; on ``"meta"`` it has shapes but no storage (for counting)."""
    with torch.device(device):
        return PolyModel(preset.model, [EmbedSpec(*spec) for spec in preset.specs], preset.task_heads)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per part (embedders, encoder, decoder, lm_head, heads) and in total; tied weights once."""
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        part = ".".join(parts[:2]) if parts[0] in ("backbone", "embedders", "heads") else parts[0]
        counts[part] = counts.get(part, 0) + param.numel()
    counts["total"] = sum(counts.values())
    return counts
