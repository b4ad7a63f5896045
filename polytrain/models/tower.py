"""Towers: a modality's embedder with an encoder of its own, a feature selection and a projector (LLaVA, Whisper).

``TowerEmbedder`` = ``Tower`` (stem + blocks of the tower's own width, a
``backbone.Stack``) + ``Projector`` into the backbone's width.  Parameter names
read ``embedders.image.tower.blocks.3.attn.qkv.weight``,
``embedders.image.tower.stem.proj.weight``, ``embedders.image.projector.fc.weight``,
so ``finetune.freeze``, ``lr_scale`` and LoRA patterns reach them like any part.
Its output is an ``Embedded`` of one vector per input token (plus the class
token where kept), with no RoPE angles: in a decoder's sequence the span's
slots keep the text's positions (LLaVA's image features take the positions of
their image tokens).  See ``polytrain/config/tower.py`` for what each setting means.

Every parameter a tower builds takes part in every forward (blocks after the
selected layer are not built), so a rank that embeds only a stand-in span runs
the same gathers under ZeRO-3 as one with real images.

Shape legend: B batch, L tokens, P prefix tokens (class + registers), E width, M mel bins, T frames.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytrain.config.model import BackboneConfig
from polytrain.config.tower import TowerConfig
from polytrain.errors import ConfigError, DataError
from polytrain.models.backbone import Stack
from polytrain.models.embed import Embedded
from polytrain.tokens import EmbedSpec, Segment

if TYPE_CHECKING:
    from polytrain.config.model import ModelConfig

FRAMES_PER_TOKEN = 2
"""Log-mel frames in one audio token read by a conv stem: its stride-2 convolution gives one vector per token."""
WHISPER_MAX_TIMESCALE = 10000.0


def whisper_sinusoids(length: int, dim: int) -> Tensor:
    """(length, dim) Whisper's position table: sin of position x inv_timescales in the first half of the channels,
    cos in the second, with timescales from 1 to 10000 spaced geometrically over the half's channels."""
    half = dim // 2
    increment = math.log(WHISPER_MAX_TIMESCALE) / (half - 1)
    inv_timescales = torch.exp(-increment * torch.arange(half, dtype=torch.float64))
    scaled = torch.arange(length, dtype=torch.float64)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1).float()


def stack_config(cfg: TowerConfig, backbone: BackboneConfig) -> BackboneConfig:
    """The tower's blocks as a ``BackboneConfig`` (pre-norm, bidirectional, no RoPE); kernels and checkpointing as
    the backbone's."""
    return BackboneConfig(dim=cfg.dim, n_heads=cfg.n_heads, encoder_layers=cfg.built_layers, decoder_layers=0,
                          mlp_width=cfg.mlp_hidden, mlp=cfg.mlp, norm=cfg.norm, norm_eps=cfg.norm_eps,
                          embed_norm=cfg.input_norm, layer_scale=cfg.layer_scale, bias=cfg.bias, position="learned",
                          dropout=cfg.dropout, attention=backbone.attention, checkpointing=backbone.checkpointing,
                          compile=backbone.compile)


class RasterPositions(nn.Module):
    """Learned positions of a ``grid`` of patches in row-major order, after ``prefix`` rows for the class and register
    tokens (timm's ``pos_embed``); an image of another grid reads the table bicubically interpolated to its grid
    (antialiased, as timm's ``resample_abs_pos_embed``). The table is read only in this module's forward, where
    sharded-parameter engines gather it."""

    def __init__(self, grid: tuple[int, int], prefix: int, dim: int):
        super().__init__()
        self.grid, self.prefix = grid, prefix
        self.table = nn.Parameter(torch.zeros(prefix + grid[0] * grid[1], dim))

    def forward(self, positions_BL2: Tensor, valid_BL: Tensor) -> tuple[Tensor, Tensor | None]:
        """(the patches' positions (B, L, E), the prefix rows (P, E) or None); each row's grid is its largest
        (row, col) + 1."""
        rows_B = torch.where(valid_BL, positions_BL2[..., 0], 0).amax(1) + 1
        cols_B = torch.where(valid_BL, positions_BL2[..., 1], 0).amax(1) + 1
        out_BLE = None
        for rows, cols in sorted(set(zip(rows_B.tolist(), cols_B.tolist()))):
            table = self.resampled(rows, cols)
            index_BL = (positions_BL2[..., 0] * cols + positions_BL2[..., 1]).clamp(0, rows * cols - 1)
            found_BLE = F.embedding(index_BL, table)
            chosen_B11 = ((rows_B == rows) & (cols_B == cols))[:, None, None]
            out_BLE = found_BLE if out_BLE is None else torch.where(chosen_B11, found_BLE, out_BLE)
        return out_BLE, self.table[: self.prefix] if self.prefix else None

    def resampled(self, rows: int, cols: int) -> Tensor:
        """(rows * cols, E): the patch rows of the table, as they are for its own grid, else interpolated."""
        grid_NE = self.table[self.prefix:]
        if (rows, cols) == self.grid:
            return grid_NE
        grid_1EHW = grid_NE.float().reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(grid_1EHW, size=(rows, cols), mode="bicubic", antialias=True, align_corners=False)
        return resized.permute(0, 2, 3, 1).reshape(rows * cols, -1).to(grid_NE.dtype)


class PatchStem(nn.Module):
    """A ViT's stem: the patch projection, learned raster positions, the class and register tokens before the
    patches (timm's order: class, registers, patches)."""

    def __init__(self, cfg: TowerConfig, spec: EmbedSpec):
        super().__init__()
        self.proj = nn.Linear(spec.input_dim, cfg.dim, bias=cfg.patch_bias)
        self.cls = nn.Parameter(torch.zeros(1, cfg.dim)) if cfg.cls_token else None
        self.registers = nn.Parameter(torch.zeros(cfg.registers, cfg.dim)) if cfg.registers else None
        side = cfg.positions
        grid = (side, side) if side else spec.grid
        self.position = RasterPositions(grid, cfg.prefix_tokens if cfg.prefix_positions else 0, cfg.dim)

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.proj.weight, std=self.proj.in_features**-0.5)  # fan-in, as PatchEmbedder's
        for param in (self.cls, self.registers, self.position.table):
            if param is not None:
                nn.init.normal_(param, std=std)

    def forward(self, segment: Segment) -> tuple[Tensor, Tensor]:
        """(B, P + L, E) vectors and (B, P + L) validity."""
        x_BLE = self.proj(segment.values.to(self.proj.weight.dtype))
        positions_BLE, prefix_PE = self.position(segment.positions, segment.mask)
        x_BLE = x_BLE + positions_BLE
        prefix = [t for t in (self.cls, self.registers) if t is not None]
        if not prefix:
            return x_BLE, segment.mask
        prefix_PE_tokens = torch.cat(prefix)
        if prefix_PE is not None:
            prefix_PE_tokens = prefix_PE_tokens + prefix_PE
        batch = x_BLE.shape[0]
        x_BLE = torch.cat([prefix_PE_tokens.to(x_BLE.dtype).expand(batch, -1, -1), x_BLE], dim=1)
        valid_BL = torch.cat([segment.mask.new_ones(batch, len(prefix_PE_tokens)), segment.mask], dim=1)
        return x_BLE, valid_BL


class ConvStem(nn.Module):
    """Whisper's stem: GELU(conv1) and GELU(conv2) over the log-mel frames, conv2 of stride 2, then its position
    table. Tokens hold 2 frames of M bins, features in (bin, frame) order, as the audio tokenizer cuts them."""

    def __init__(self, cfg: TowerConfig, spec: EmbedSpec):
        super().__init__()
        if spec.input_dim % FRAMES_PER_TOKEN:
            raise ConfigError("tokenizers.audio.patch_frames", spec.input_dim, "a conv stem reads tokens of 2 frames")
        self.mels = spec.input_dim // FRAMES_PER_TOKEN
        self.conv1 = nn.Conv1d(self.mels, cfg.dim, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.dim, cfg.dim, kernel_size=3, stride=FRAMES_PER_TOKEN, padding=1)
        rows = cfg.positions or spec.grid[1]
        if spec.grid[1] > rows:
            raise ConfigError("tokenizers.audio.max_seconds", f"{spec.grid[1]} tokens", f"a clip may give at most "
                              f"the tower's {rows} positions (model.towers.audio.positions)")
        self.position = nn.Embedding(rows, cfg.dim)

    def init_weights(self, std: float) -> None:
        with torch.no_grad():
            self.position.weight.copy_(whisper_sinusoids(*self.position.weight.shape))

    def forward(self, segment: Segment) -> tuple[Tensor, Tensor]:
        """(B, L, E) vectors (one per token) and (B, L) validity; padding reads as zero frames, as the convolutions'
        own padding does, so a clip computes the same alone and in a padded batch."""
        batch, length, _ = segment.values.shape
        values = segment.values.to(self.conv1.weight.dtype) * segment.mask[..., None]
        frames_BMT = values.view(batch, length, self.mels, FRAMES_PER_TOKEN).permute(0, 2, 1, 3).reshape(
            batch, self.mels, length * FRAMES_PER_TOKEN)
        x_BEL = F.gelu(self.conv2(F.gelu(self.conv1(frames_BMT))))
        return x_BEL.transpose(1, 2) + self.position(segment.positions[..., 1]), segment.mask


STEMS = {"patch": PatchStem, "conv": ConvStem}


class Tower(Stack):
    """The stem, then the tower's blocks (those up to the selected layer), its input norm and final norm where
    configured; the output without the prefix tokens (the class token first where kept)."""

    def __init__(self, cfg: TowerConfig, spec: EmbedSpec, backbone: BackboneConfig):
        super().__init__(stack_config(cfg, backbone), cfg.built_layers, causal=False, cross_attention=False,
                         final_norm=cfg.final_norm)
        self.stem = STEMS[cfg.stem](cfg, spec)
        self.prefix, self.keep_cls = cfg.prefix_tokens, cfg.keep_cls

    def forward(self, segment: Segment) -> tuple[Tensor, Tensor]:
        """The selected features (B, L [+1], E_tower) and their validity."""
        x_BLE, valid_BL = self.stem(segment)
        h_BLE = super().forward(Embedded(x_BLE, valid_BL))
        if not self.keep_cls:
            return h_BLE[:, self.prefix:], valid_BL[:, self.prefix:]
        return (torch.cat([h_BLE[:, :1], h_BLE[:, self.prefix:]], 1),
                torch.cat([valid_BL[:, :1], valid_BL[:, self.prefix:]], 1))


class Projector(nn.Module):
    """Into the backbone's width: ``fc`` (linear), or ``fc``, GELU, ``proj`` (LLaVA-1.5's ``mlp2x_gelu``)."""

    def __init__(self, kind: str, dim: int, out: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(dim, out, bias=bias)
        self.proj = nn.Linear(out, out, bias=bias) if kind == "mlp2x_gelu" else None

    def forward(self, x_BLE: Tensor) -> Tensor:
        x_BLE = self.fc(x_BLE)
        return x_BLE if self.proj is None else self.proj(F.gelu(x_BLE))


class TowerEmbedder(nn.Module):
    """A modality's tower and projector: Segment -> ``Embedded`` at the backbone's width, one vector per token."""

    def __init__(self, spec: EmbedSpec, cfg: ModelConfig, tower: TowerConfig):
        """``cfg``: the model config the tower's output feeds (the encoder side's, where the encoder has its own
        blocks)."""
        super().__init__()
        dim = cfg.backbone.dim
        self.tower = Tower(tower, spec, cfg.backbone)
        self.projector = None if tower.projector == "none" else Projector(tower.projector, tower.dim, dim,
                                                                         tower.projector_bias)
        self.modality = nn.Parameter(0.02 * torch.randn(dim)) if cfg.embed.modality_vector else None

    @property
    def added_tokens(self) -> int:
        """Output vectors beyond one per input token (the kept class token)."""
        return int(self.tower.keep_cls)

    def init_weights(self, std: float) -> None:
        self.tower.stem.init_weights(std)

    def forward(self, segment: Segment) -> Embedded:
        if segment.documents is not None:
            raise DataError(f"a {segment.modality} tower reads one sample per row, not packed rows")
        x_BLE, valid_BL = self.tower(segment)
        if self.projector is not None:
            x_BLE = self.projector(x_BLE)
        if self.modality is not None:
            x_BLE = x_BLE + self.modality
        return Embedded(x_BLE, valid_BL)
