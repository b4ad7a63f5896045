"""The small parts a block is made of: normalization, the MLP, layer scale, stochastic depth.

Norms and MLPs are looked up by name (``NORMS``, ``MLPS``), so a config picks
LayerNorm or RMSNorm, GELU or SwiGLU without branching in the block.

Shape legend: B batch, L length, E model dim, F MLP hidden width.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """proj(act(fc(x))): the Transformer's position-wise feed-forward network."""

    def __init__(self, dim: int, hidden: int, bias: bool, dropout: float, act: nn.Module):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.act = act
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BLE: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x_BLE))))


def gelu_mlp(dim: int, hidden: int, bias: bool, dropout: float) -> MLP:
    """Exact (erf) GELU, as in BERT, ViT and BART."""
    return MLP(dim, hidden, bias, dropout, nn.GELU())


def gelu_tanh_mlp(dim: int, hidden: int, bias: bool, dropout: float) -> MLP:
    """The tanh approximation of GELU, as in GPT-2 (``gelu_new``)."""
    return MLP(dim, hidden, bias, dropout, nn.GELU(approximate="tanh"))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def quick_gelu_mlp(dim: int, hidden: int, bias: bool, dropout: float) -> MLP:
    """OpenAI CLIP's QuickGELU (its ViTs under ``hidden_act: quick_gelu``, timm's ``*_clip_quickgelu_*``)."""
    return MLP(dim, hidden, bias, dropout, QuickGELU())


def relu_mlp(dim: int, hidden: int, bias: bool, dropout: float) -> MLP:
    """ReLU, as in the original Transformer."""
    return MLP(dim, hidden, bias, dropout, nn.ReLU())


class SwiGLU(nn.Module):
    """proj(silu(gate(x)) * up(x)) (Shazeer 2020); gate and up share one matmul, ``fc``."""

    def __init__(self, dim: int, hidden: int, bias: bool, dropout: float):
        super().__init__()
        self.fc = nn.Linear(dim, 2 * hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BLE: Tensor) -> Tensor:
        gate_BLF, up_BLF = self.fc(x_BLE).chunk(2, dim=-1)
        return self.drop(self.proj(F.silu(gate_BLF) * up_BLF))


class LayerScale(nn.Module):
    """A residual branch times a learned per-channel vector (Touvron et al. 2021, CaiT; DINOv2)."""

    INIT = 1e-5

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), self.INIT))

    def forward(self, branch_BLE: Tensor) -> Tensor:
        return branch_BLE * self.gamma


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a whole residual branch per sample, rescale the kept ones."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, branch_BLE: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return branch_BLE
        keep = 1.0 - self.rate
        keep_B11 = torch.empty(branch_BLE.shape[0], 1, 1, dtype=branch_BLE.dtype,
                               device=branch_BLE.device).bernoulli_(keep)
        return branch_BLE * keep_B11 / keep
