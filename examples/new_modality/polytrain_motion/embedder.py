"""Motion patches -> model vectors: one linear map, plus a learned vector per time position.

It builds on polytrain's ``Embedder`` base class, which adds the modality vector and, when the
backbone uses RoPE, the rotation angles of each token's position.

Shape legend: B batch, L patches, D features per patch, E model dim.
"""

from torch import nn

from polytrain.models.embed import Embedded, Embedder
from polytrain.tokens import EmbedSpec, Segment


class MotionEmbedder(Embedder):
    def __init__(self, spec: EmbedSpec, cfg):
        super().__init__(cfg)
        dim = cfg.backbone.dim
        self.proj = nn.Linear(spec.input_dim, dim)
        self.position = nn.Embedding(spec.grid[1], dim) if self.kind.table is not None else None

    def init_weights(self, std: float) -> None:
        """Fan-in init, as a ViT's patch projection: a patch's content starts above its position's vector."""
        nn.init.normal_(self.proj.weight, std=self.proj.in_features**-0.5)

    def forward(self, segment: Segment) -> Embedded:
        x_BLE = self.proj(segment.values.to(self.proj.weight.dtype))
        if self.position is not None:
            x_BLE = x_BLE + self.position(segment.positions[..., 1])
        return self.finish(x_BLE, segment)
