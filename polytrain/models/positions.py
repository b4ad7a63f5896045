"""Position encodings: learned and sinusoidal tables (added by the embedders), RoPE and ALiBi (inside attention).

Every token carries a (row, col) position on its modality's grid; text uses
row 0.  Absolute encodings are added to the token vectors.  RoPE rotates
queries and keys by angles the embedders compute once per segment: 1-D for
text (every frequency pair turns with the column), 2-D for patch grids (half
the pairs turn with the row, half with the column).  ALiBi biases scores by
the distance between token indices in the attended sequence.

Shape legend: B batch, L length, E model dim, H heads, D head dim, P = D/2 rotation pairs.
"""

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(n_positions: int, dim: int) -> Tensor:
    """(n_positions, dim): PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(...) (Vaswani et al. 2017)."""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table.float()


class Rotary(nn.Module):
    """RoPE angles (Su et al. 2021) for 1-D (text) or 2-D (patch grid) positions."""

    def __init__(self, head_dim: int, base: float, two_d: bool):
        super().__init__()
        self.two_d = two_d
        pairs = head_dim // 4 if two_d else head_dim // 2  # per axis
        inv_freq = base ** (-torch.arange(pairs, dtype=torch.float64) / pairs)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, positions_BL2: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (B, L, P) float32."""
        pos = positions_BL2.float()
        if self.two_d:
            angles_BLP = torch.cat([pos[..., 0, None] * self.inv_freq, pos[..., 1, None] * self.inv_freq], dim=-1)
        else:
            angles_BLP = pos[..., 1, None] * self.inv_freq
        return angles_BLP.cos(), angles_BLP.sin()


def apply_rotary(x_BLHD: Tensor, cos_BLP: Tensor, sin_BLP: Tensor) -> Tensor:
    """Rotate pair (x[i], x[i + D/2]) by the angle of pair i (the "rotate half" layout of GPT-NeoX and Llama)."""
    first, second = x_BLHD.chunk(2, dim=-1)
    cos, sin = cos_BLP[:, :, None].to(x_BLHD.dtype), sin_BLP[:, :, None].to(x_BLHD.dtype)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def alibi_slopes(n_heads: int) -> Tensor:
    """(H,) head slopes of ALiBi (Press et al. 2022): the geometric sequence 2^(-8/n), 2^(-16/n), ...

    For a head count that is not a power of two, the paper takes the slopes of
    the nearest lower power of two and fills up with every other slope of the
    next power of two.
    """

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    lower = 2 ** int(math.floor(math.log2(n_heads)))
    slopes = geometric(lower) + geometric(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)
