"""One embedder per modality: Segment -> (B, L, dim), with position and modality embeddings added.

Every embedder adds a learned modality vector, so the shared backbone can
tell a text token from an image patch without branching on modality.

Shape legend: B batch, L length, D patch features, E model dim.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytrain.registry import Registry
from polytrain.tokens import EmbedSpec, Segment

EMBEDDERS: Registry[type[nn.Module]] = Registry("embedder")
"""Embedder class by modality name; built as ``cls(spec, dim)``."""


@EMBEDDERS.register("text")
class TokenEmbedder(nn.Module):
    """Token ids -> vectors, plus learned 1-D positions. Its table doubles as the LM output projection.

    Called with a Segment it embeds; called with hidden states (B, T, E) it returns the tied
    logits (B, T, V). Both uses run inside this module's forward, where sharded-parameter engines
    (ZeRO-3) gather the table.
    """

    def __init__(self, spec: EmbedSpec, dim: int):
        super().__init__()
        self.table = nn.Embedding(spec.input_dim, dim)
        self.position = nn.Embedding(spec.grid[1], dim)
        self.modality = nn.Parameter(0.02 * torch.randn(dim))

    def forward(self, x: Segment | Tensor) -> Tensor:
        if isinstance(x, Tensor):
            return F.linear(x, self.table.weight)
        return self.table(x.values) + self.position(x.positions[..., 1]) + self.modality


@EMBEDDERS.register("image")
@EMBEDDERS.register("audio")
class PatchEmbedder(nn.Module):
    """Patch features -> vectors by one linear map, plus learned row and column positions (any grid size)."""

    def __init__(self, spec: EmbedSpec, dim: int):
        super().__init__()
        self.proj = nn.Linear(spec.input_dim, dim)
        self.row = nn.Embedding(spec.grid[0], dim)
        self.col = nn.Embedding(spec.grid[1], dim)
        self.modality = nn.Parameter(0.02 * torch.randn(dim))

    def init_weights(self) -> None:
        """Fan-in init: normalized patches keep unit scale, well above the 0.02-scale positions.

        With the generic 0.02 init a patch's content is no larger than its position
        embedding and every image starts out looking alike (a ViT's patch convolution
        is fan-in initialized for the same reason).
        """
        nn.init.normal_(self.proj.weight, std=self.proj.in_features**-0.5)

    def forward(self, segment: Segment) -> Tensor:
        x_BLD = segment.values.to(self.proj.weight.dtype)  # patches arrive fp32; weights may be bf16
        rows, cols = segment.positions.unbind(-1)
        return self.proj(x_BLD) + self.row(rows) + self.col(cols) + self.modality

