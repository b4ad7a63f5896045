"""The key/value cache for incremental decoding.

Each decoder layer keeps the keys and values of every token fed so far in
buffers sized for the whole generation, and the projections of the encoder
output it cross-attends to, computed on the first step and reused after.
Beam search reorders rows with ``reorder``.

Shape legend: B batch (rows being decoded), C capacity in tokens, S length so far, G key/value heads, D head dim.
"""

from torch import Tensor


class LayerCache:
    """One layer's keys and values; ``append`` writes the new ones and returns all of them so far."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.k_BCGD: Tensor | None = None
        self.v_BCGD: Tensor | None = None
        self.memory: tuple[Tensor, Tensor] | None = None
        """Cross-attention keys and values of the encoder output, (B, S_memory, G, D) each."""

    def append(self, k_BLGD: Tensor, v_BLGD: Tensor) -> tuple[Tensor, Tensor]:
        if self.k_BCGD is None:
            batch, _, kv_heads, head_dim = k_BLGD.shape
            self.k_BCGD = k_BLGD.new_empty(batch, self.capacity, kv_heads, head_dim)
            self.v_BCGD = v_BLGD.new_empty(batch, self.capacity, kv_heads, head_dim)
        end = self.length + k_BLGD.shape[1]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; feeding {end}")
        self.k_BCGD[:, self.length: end] = k_BLGD
        self.v_BCGD[:, self.length: end] = v_BLGD
        self.length = end
        return self.k_BCGD[:, :end], self.v_BCGD[:, :end]

    def reorder(self, rows_B: Tensor) -> None:
        if self.k_BCGD is not None:
            self.k_BCGD, self.v_BCGD = self.k_BCGD[rows_B], self.v_BCGD[rows_B]
        if self.memory is not None:
            self.memory = (self.memory[0][rows_B], self.memory[1][rows_B])


class KVCache:
    """Every layer of one decoder stack, plus which cached tokens are real (for a padded prefix)."""

    def __init__(self, n_layers: int, capacity: int):
        self.layers = [LayerCache(capacity) for _ in range(n_layers)]
        self.capacity = capacity
        self.valid_BC: Tensor | None = None
        self.length = 0

    def extend(self, valid_BL: Tensor) -> Tensor:
        """Mark ``valid_BL`` as the next tokens' validity; returns the validity of all keys (B, S)."""
        if self.valid_BC is None:
            self.valid_BC = valid_BL.new_zeros(valid_BL.shape[0], self.capacity)
        end = self.length + valid_BL.shape[1]
        self.valid_BC[:, self.length: end] = valid_BL
        return self.valid_BC[:, :end]

    def advance(self, n_tokens: int) -> None:
        """Called once every layer has appended ``n_tokens``."""
        self.length += n_tokens

    def reorder(self, rows_B: Tensor) -> None:
        """Keep rows ``rows_B`` (beam search: the beams each new beam continues)."""
        if self.valid_BC is not None:
            self.valid_BC = self.valid_BC[rows_B]
        for layer in self.layers:
            layer.reorder(rows_B)
