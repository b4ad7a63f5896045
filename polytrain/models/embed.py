"""One embedder per modality: Segment -> ``Embedded`` (B, L, dim) vectors and what attention needs of them.

Absolute positions (learned or sinusoidal) are added here; for RoPE the
embedder computes the rotation angles of its tokens (1-D for text, 2-D for
patch grids), since only it knows the shape of its modality's grid.  An
optional learned modality vector lets the shared backbone tell a text token
from an image patch without branching on modality.

Shape legend: B batch, L length, D patch features, E model dim, P rotation pairs per head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytrain.config.registries import POSITIONS
from polytrain.models.positions import Rotary, sinusoidal_table
from polytrain.tokens import EmbedSpec, Segment

if TYPE_CHECKING:
    from polytrain.config.model import ModelConfig



@dataclass
class Embedded:
    """Token vectors and, per token, what attention needs: validity, document, rotation."""

    x_BLE: Tensor
    valid_BL: Tensor
    """True at real tokens."""
    documents_BL: Tensor | None = None
    """Document index per token of packed rows (-1 at padding); None: one document per row."""
    rope: tuple[Tensor, Tensor] | None = None
    """RoPE (cos, sin), (B, L, P) each; None unless ``position`` is ``rope``."""
    spans_BL: Tensor | None = None
    """Index of the bidirectional span each token lies in (-1: none); a causal stack lets a span's tokens
    see each other whole (prefix-LM). None: no such spans."""

    @property
    def length(self) -> int:
        return self.x_BLE.shape[1]

    def then(self, after: Embedded) -> Embedded:
        """This sequence followed by ``after`` (a prompt, then the tokens generated after it)."""
        docs = None
        if self.documents_BL is not None or after.documents_BL is not None:
            docs = torch.cat([self.documents_or_zeros(), after.documents_or_zeros()], dim=1)
        rope = None
        if self.rope is not None:
            rope = (torch.cat([self.rope[0], after.rope[0]], 1), torch.cat([self.rope[1], after.rope[1]], 1))
        spans = None
        if self.spans_BL is not None or after.spans_BL is not None:
            spans = torch.cat([self.spans_or_none(), after.spans_or_none()], dim=1)
        return Embedded(torch.cat([self.x_BLE, after.x_BLE], 1), torch.cat([self.valid_BL, after.valid_BL], 1),
                        docs, rope, spans)

    def spans_or_none(self) -> Tensor:
        return self.spans_BL if self.spans_BL is not None else torch.full_like(self.valid_BL, -1, dtype=torch.long)

    def documents_or_zeros(self) -> Tensor:
        if self.documents_BL is not None:
            return self.documents_BL
        return torch.where(self.valid_BL, 0, -1)


class SinusoidalEmbedding(nn.Module):
    """A fixed sinusoidal table behind the ``nn.Embedding`` call; a buffer, so not in the state dict."""

    def __init__(self, n_positions: int, dim: int):
        super().__init__()
        self.register_buffer("table", sinusoidal_table(n_positions, dim), persistent=False)

    def forward(self, index: Tensor) -> Tensor:
        return self.table[index]


class Embedder(nn.Module):
    """What every embedder shares: the modality vector and the RoPE angles."""

    rope_two_d = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        backbone = cfg.backbone
        self.kind = POSITIONS.get(backbone.position)
        self.modality = nn.Parameter(0.02 * torch.randn(backbone.dim)) if cfg.embed.modality_vector else None
        self.rotary = Rotary(backbone.head_dim, backbone.rope_base, self.rope_two_d) if self.kind.rotary else None

    def finish(self, x_BLE: Tensor, segment: Segment) -> Embedded:
        if self.modality is not None:
            x_BLE = x_BLE + self.modality
        rope = None if self.rotary is None else self.rotary(segment.positions)
        return Embedded(x_BLE, segment.mask, segment.documents, rope)


class TokenEmbedder(Embedder):
    """Token ids -> vectors plus 1-D positions. Its table doubles as the LM output projection when tied.

    Called with a Segment it embeds (``decoder=True``: for the decoder stack, with its own position
    table where the model keeps one); called with hidden states (B, T, E) it returns the tied
    logits (B, T, V), plus the output bias with ``lm_bias``. Both uses run inside this module's
    forward, where sharded-parameter engines (ZeRO-3) gather the table.
    """

    def __init__(self, spec: EmbedSpec, cfg: ModelConfig):
        super().__init__(cfg)
        dim = cfg.backbone.dim
        self.table = nn.Embedding(spec.input_dim, dim)
        self.scale = dim**0.5 if cfg.embed.scale_tokens else 1.0
        self.token_type = nn.Embedding(cfg.embed.token_types, dim) if cfg.embed.token_types else None
        if self.kind.table is None:
            self.position = None
        elif self.kind.table == "sinusoidal":
            self.position = SinusoidalEmbedding(spec.grid[1], dim)
        else:
            self.position = nn.Embedding(spec.grid[1], dim)
        self.decoder_position = nn.Embedding(spec.grid[1], dim) if cfg.embed.decoder_positions else None
        tied_bias = cfg.lm_bias and cfg.tie_embeddings
        self.output_bias = nn.Parameter(torch.zeros(spec.input_dim)) if tied_bias else None

    def forward(self, x: Segment | Tensor, decoder: bool = False) -> Embedded | Tensor:
        if isinstance(x, Tensor):
            return F.linear(x, self.table.weight, self.output_bias)
        return self.embed(x, decoder)

    def embed(self, segment: Segment, decoder: bool) -> Embedded:
        x_BLE = self.table(segment.values)
        if self.scale != 1.0:
            x_BLE = x_BLE * self.scale
        if self.token_type is not None:
            x_BLE = x_BLE + self.token_type(torch.zeros_like(segment.values))
        return self.finish(x_BLE + self.positions_at(segment.positions, decoder), segment)

    def positions_at(self, positions_X2: Tensor, decoder: bool = False) -> Tensor | float:
        """The absolute position vectors (..., E) text adds at ``positions`` (0.0 without a table): what a tower's
        vectors placed at text slots add too, as a Hugging Face LM adds its positions to ``inputs_embeds``."""
        position = self.decoder_position if decoder and self.decoder_position is not None else self.position
        return 0.0 if position is None else position(positions_X2[..., 1])


class LearnedGrid(nn.Module):
    """A learned row vector plus a learned column vector: positions on any grid up to (rows, cols)."""

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        self.row = nn.Embedding(grid[0], dim)
        self.col = nn.Embedding(grid[1], dim)

    def forward(self, positions_BL2: Tensor) -> Tensor:
        return self.row(positions_BL2[..., 0]) + self.col(positions_BL2[..., 1])


class LearnedRaster(nn.Module):
    """One learned vector per patch in row-major order; entry 0 belongs to the [CLS] token (timm's layout).

    The [CLS] token sits at position (0, -1), just before the first patch, so its vector is looked up
    through this module's forward like every other (where sharded-parameter engines gather the table).
    """

    CLS_POSITION = (0, -1)

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        self.cols = grid[1]
        self.table = nn.Embedding(1 + grid[0] * grid[1], dim)

    def forward(self, positions_BL2: Tensor) -> Tensor:
        return self.table(1 + positions_BL2[..., 0] * self.cols + positions_BL2[..., 1])


class SinusoidalGrid(nn.Module):
    """2-D sinusoidal positions: the first half of the channels encode the row, the second the column (MAE)."""

    def __init__(self, grid: tuple[int, int], dim: int):
        super().__init__()
        self.row = SinusoidalEmbedding(grid[0], dim // 2)
        self.col = SinusoidalEmbedding(grid[1], dim - dim // 2)

    def forward(self, positions_BL2: Tensor) -> Tensor:
        return torch.cat([self.row(positions_BL2[..., 0]), self.col(positions_BL2[..., 1])], dim=-1)


class PatchEmbedder(Embedder):
    """Patch features -> vectors by one linear map (a ViT's patch convolution), plus 2-D positions."""

    rope_two_d = True

    def __init__(self, spec: EmbedSpec, cfg: ModelConfig):
        super().__init__(cfg)
        dim = cfg.backbone.dim
        self.proj = nn.Linear(spec.input_dim, dim)
        self.cls = nn.Parameter(torch.zeros(dim)) if cfg.embed.cls_token else None
        if self.kind.table is None:
            self.position = None
        elif self.kind.table == "sinusoidal":
            self.position = SinusoidalGrid(spec.grid, dim)
        elif cfg.embed.patch_positions == "raster":
            self.position = LearnedRaster(spec.grid, dim)
        else:
            self.position = LearnedGrid(spec.grid, dim)

    def init_weights(self, std: float) -> None:
        """Fan-in init of the patch projection: normalized patches keep unit scale, above the positions.

        With the generic ``std`` a patch's content is no larger than its position
        embedding and every image starts out looking alike (a ViT's patch
        convolution is fan-in initialized for the same reason).
        """
        nn.init.normal_(self.proj.weight, std=self.proj.in_features**-0.5)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=std)

    def forward(self, segment: Segment) -> Embedded:
        x_BLE = self.proj(segment.values.to(self.proj.weight.dtype))  # patches arrive fp32; weights may be bf16
        if self.position is not None:
            x_BLE = x_BLE + self.position(segment.positions)
        embedded = self.finish(x_BLE, segment)
        return embedded if self.cls is None else self.with_cls(embedded)

    def with_cls(self, e: Embedded) -> Embedded:
        """Prepend [CLS]: real, in the first token's document, unrotated, at raster position 0 when raster."""
        cls_E = self.cls
        if isinstance(self.position, LearnedRaster):
            cls_E = cls_E + self.position(torch.tensor(LearnedRaster.CLS_POSITION, device=cls_E.device))
        if self.modality is not None:
            cls_E = cls_E + self.modality
        batch = e.x_BLE.shape[0]
        x_BLE = torch.cat([cls_E.to(e.x_BLE.dtype).expand(batch, 1, -1), e.x_BLE], dim=1)
        valid_BL = torch.cat([e.valid_BL.new_ones(batch, 1), e.valid_BL], dim=1)
        docs_BL = None if e.documents_BL is None else torch.cat([e.documents_BL[:, :1], e.documents_BL], dim=1)
        rope = None
        if e.rope is not None:
            cos, sin = e.rope
            rope = (torch.cat([torch.ones_like(cos[:, :1]), cos], 1), torch.cat([torch.zeros_like(sin[:, :1]), sin], 1))
        return Embedded(x_BLE, valid_BL, docs_BL, rope)
