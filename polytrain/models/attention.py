"""Multi-head attention over ``torch.nn.functional.scaled_dot_product_attention``.

SDPA picks its kernel (FlashAttention, memory-efficient, cuDNN or math) from
the device, dtype and mask; on CPU it runs its fused CPU kernel or math.

Shape legend: B batch, H heads, L query length, S key length, D head dim, E model dim.
"""

import torch.nn.functional as F
from torch import Tensor, nn


def attend(q_BHLD: Tensor, k_BHSD: Tensor, v_BHSD: Tensor, mask: Tensor, dropout_p: float) -> Tensor:
    """Softmax attention; ``mask`` is bool, broadcastable to (B, H, L, S), True where a query may look."""
    return F.scaled_dot_product_attention(q_BHLD, k_BHSD, v_BHSD, attn_mask=mask, dropout_p=dropout_p)


class MultiHeadAttention(nn.Module):
    """Self-attention, or cross-attention to ``memory`` when built with ``cross=True``."""

    def __init__(self, dim: int, n_heads: int, dropout: float, cross: bool = False):
        super().__init__()
        self.n_heads, self.dropout, self.cross = n_heads, dropout, cross
        if cross:
            self.q = nn.Linear(dim, dim)
            self.kv = nn.Linear(dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x_BLE: Tensor, mask: Tensor, memory_BSE: Tensor | None = None) -> Tensor:
        if self.cross:
            q_BLE = self.q(x_BLE)
            k_BSE, v_BSE = self.kv(memory_BSE).chunk(2, dim=-1)
        else:
            q_BLE, k_BSE, v_BSE = self.qkv(x_BLE).chunk(3, dim=-1)
        q, k, v = (self.split_heads(t) for t in (q_BLE, k_BSE, v_BSE))
        y_BHLD = attend(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.out(y_BHLD.transpose(1, 2).flatten(2))

    def split_heads(self, t_BLE: Tensor) -> Tensor:
        batch, length, dim = t_BLE.shape
        return t_BLE.view(batch, length, self.n_heads, dim // self.n_heads).transpose(1, 2)
