"""The shared Transformer: pre-norm blocks stacked into an encoder and a decoder.

One ``Block`` serves both stacks: the encoder's are bidirectional, the
decoder's causal with cross-attention to the encoder output when there is one.

Shape legend: B batch, L length, S memory length, E model dim.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polytrain.errors import ConfigError
from polytrain.models.attention import MultiHeadAttention


@dataclass(frozen=True)
class BackboneConfig:
    dim: int = 256
    """Width of every token vector (d_model)."""
    n_heads: int = 4
    """Attention heads per layer; must divide ``dim``."""
    encoder_layers: int = 2
    """Bidirectional blocks; 0 builds a decoder-only backbone."""
    decoder_layers: int = 2
    """Causal blocks (with cross-attention when there is an encoder)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of ``dim``."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches, during training only."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon."""

    def check(self) -> None:
        if self.dim <= 0 or self.n_heads <= 0 or self.dim % self.n_heads:
            raise ConfigError("n_heads", self.n_heads, f"must be positive and divide dim={self.dim}")
        if self.encoder_layers < 0:
            raise ConfigError("encoder_layers", self.encoder_layers, "must be >= 0")
        if self.decoder_layers < 1:
            raise ConfigError("decoder_layers", self.decoder_layers, "must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("dropout", self.dropout, "must be in [0, 1)")
        if self.mlp_ratio <= 0:
            raise ConfigError("mlp_ratio", self.mlp_ratio, "must be > 0")

    @property
    def mlp_hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-norm: x + attn(norm(x)) [+ cross(norm(x), memory)] + mlp(norm(x))."""

    def __init__(self, dim: int, n_heads: int, mlp_hidden: int, dropout: float, eps: float,
                 cross_attention: bool):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.attn = MultiHeadAttention(dim, n_heads, dropout)
        self.cross_norm = nn.LayerNorm(dim, eps=eps) if cross_attention else None
        self.cross = MultiHeadAttention(dim, n_heads, dropout, cross=True) if cross_attention else None
        self.mlp_norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_hidden, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BLE: Tensor, mask: Tensor, memory_BSE: Tensor | None = None,
                memory_mask: Tensor | None = None) -> Tensor:
        x_BLE = x_BLE + self.drop(self.attn(self.attn_norm(x_BLE), mask))
        if self.cross is not None and memory_BSE is not None:
            x_BLE = x_BLE + self.drop(self.cross(self.cross_norm(x_BLE), memory_mask, memory_BSE))
        return x_BLE + self.mlp(self.mlp_norm(x_BLE))


class Stack(nn.Module):
    """``n_layers`` blocks and the final norm a pre-norm stack needs."""

    def __init__(self, cfg: BackboneConfig, n_layers: int, causal: bool, cross_attention: bool):
        super().__init__()
        self.causal = causal
        self.blocks = nn.ModuleList(
            Block(cfg.dim, cfg.n_heads, cfg.mlp_hidden, cfg.dropout, cfg.norm_eps, cross_attention)
            for _ in range(n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x_BLE: Tensor, valid_BL: Tensor, memory_BSE: Tensor | None = None,
                memory_valid_BS: Tensor | None = None) -> Tensor:
        mask = self_attention_mask(valid_BL, self.causal)
        memory_mask = None if memory_valid_BS is None else memory_valid_BS[:, None, None, :]
        for block in self.blocks:
            x_BLE = block(x_BLE, mask, memory_BSE, memory_mask)
        return self.norm(x_BLE)


class Backbone(nn.Module):
    """An encoder stack (absent when ``encoder_layers`` is 0) and a decoder stack."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        with_encoder = cfg.encoder_layers > 0
        self.encoder = Stack(cfg, cfg.encoder_layers, causal=False, cross_attention=False) if with_encoder else None
        self.decoder = Stack(cfg, cfg.decoder_layers, causal=True, cross_attention=with_encoder)

    def encode(self, x_BSE: Tensor, valid_BS: Tensor) -> Tensor:
        return self.encoder(x_BSE, valid_BS)

    def decode(self, x_BTE: Tensor, valid_BT: Tensor, memory_BSE: Tensor | None = None,
               memory_valid_BS: Tensor | None = None) -> Tensor:
        return self.decoder(x_BTE, valid_BT, memory_BSE, memory_valid_BS)


def self_attention_mask(valid_BL: Tensor, causal: bool) -> Tensor:
    """(B, 1, L, L) bool: keys must be real tokens (and not in the future, when causal).

    A padded query still sees the real keys, so no row is empty and no NaN appears.
    """
    mask = valid_BL[:, None, None, :]
    if causal:
        length = valid_BL.shape[1]
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=valid_BL.device).tril()
    return mask
