"""The whole model: one embedder per modality, the shared backbone, one head per task.

Shape legend: B batch, T text length, E model dim, V vocabulary.
"""

import math
from dataclasses import dataclass, field

from torch import Tensor, nn

from polytrain.errors import ConfigError
from polytrain.models.backbone import Backbone, BackboneConfig
from polytrain.models.embed import EMBEDDERS
from polytrain.models.heads import HEADS
from polytrain.tokens import EmbedSpec, Segment, TaskBatch

RESIDUAL_OUTPUTS = ("attn.out.weight", "cross.out.weight", "mlp.proj.weight")
"""Projections that write into the residual stream; initialized smaller so depth does not blow it up."""


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    init_std: float = 0.02
    """Std of the normal init of every linear and embedding weight (residual outputs: / sqrt(2 * layers))."""

    def check(self) -> None:
        if self.init_std <= 0:
            raise ConfigError("init_std", self.init_std, "must be > 0")


class PolyModel(nn.Module):
    """``forward(batch)`` returns the mean next-token loss of every task in ``batch``."""

    def __init__(self, cfg: ModelConfig, specs: list[EmbedSpec], task_heads: dict[str, str]):
        super().__init__()
        if "text" not in {s.modality for s in specs}:
            raise ValueError("the model decodes text, so it needs the text embed spec")
        dim = cfg.backbone.dim
        self.embedders = nn.ModuleDict({s.modality: EMBEDDERS.get(s.modality)(s, dim) for s in specs})
        self.backbone = Backbone(cfg.backbone)
        self.heads = nn.ModuleDict({task: HEADS.get(head)() for task, head in task_heads.items()})
        self.init_weights(cfg.init_std)

    def init_weights(self, std: float) -> None:
        """Normal(0, std) for every linear and embedding weight, then each embedder's own init, if it has one."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for embedder in self.embedders.values():
            if hasattr(embedder, "init_weights"):
                embedder.init_weights()
        layers = len(self.backbone.decoder.blocks) + (len(self.backbone.encoder.blocks) if self.backbone.encoder else 0)
        for name, param in self.named_parameters():
            if name.endswith(RESIDUAL_OUTPUTS):
                nn.init.normal_(param, std=std / math.sqrt(2 * layers))

    def embed(self, segment: Segment) -> Tensor:
        return self.embedders[segment.modality](segment)

    def lm_logits(self, h_BTE: Tensor) -> Tensor:
        """Next-token logits (B, T, V), tied to the text embedding table."""
        return self.embedders["text"](h_BTE)

    def forward(self, batch: dict[str, TaskBatch]) -> dict[str, Tensor]:
        """The training loss of every task in ``batch``, as its head defines it."""
        return {task: self.heads[task].loss(self, part) for task, part in batch.items()}
