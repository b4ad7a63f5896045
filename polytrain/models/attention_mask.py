"""Which keys each query may attend to: one rule, written once, read by every attention kernel.

A ``MaskRule`` describes padding, causality, bidirectional spans inside a
causal sequence (prefix-LM: an image's patches see each other whole) and
packed documents.  ``allowed(b, q, k)`` evaluates it on broadcastable index
tensors, so the same function builds SDPA's dense boolean mask and serves as
FlexAttention's ``mask_mod``; ``runs`` gives FlashAttention's variable-length
form.  Stacks build one rule per forward, not one per block.

Shape legend: B batch, L query length, S key length, H heads.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MaskRule:
    """Query ``q`` (absolute index ``offset + q`` among the keys) may see key ``k`` when all of these hold:

    the key is a real token; when causal, ``k <= offset + q`` or query and key
    lie in the same bidirectional span (``spans_BL``); when documents are given, both are
    in the same document.  In self-attention a query always sees itself, so a
    padded query has a non-empty row and no NaN appears (its output is ignored).
    """

    key_valid_BS: Tensor
    query_valid_BL: Tensor
    causal: bool = False
    spans_BL: Tensor | None = None
    """(B, L) index of the bidirectional span each query lies in, -1 outside any; tokens of one span see each
    other whole even under ``causal``. Self-attention without an offset only (the queries are the keys)."""
    offset: int = 0
    """Absolute index of query 0 among the keys (tokens already in the KV cache)."""
    query_docs_BL: Tensor | None = None
    key_docs_BS: Tensor | None = None
    self_attention: bool = True

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.query_valid_BL.shape[0], self.query_valid_BL.shape[1], self.key_valid_BS.shape[1]

    def allowed(self, b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Bool of the broadcast shape of the index tensors ``b``, ``q``, ``k``."""
        absolute_q = q + self.offset
        ok = self.key_valid_BS[b, k]
        if self.causal:
            seen = k <= absolute_q
            if self.spans_BL is not None:
                span = self.spans_BL[b, q]
                seen = seen | ((span == self.spans_BL[b, k]) & (span >= 0))
            ok = ok & seen
        if self.query_docs_BL is not None:
            ok = ok & ((self.query_docs_BL[b, q] == self.key_docs_BS[b, k]) | ~self.query_valid_BL[b, q])
        if self.self_attention:
            ok = ok | (k == absolute_q)
        return ok

    def dense(self) -> Tensor:
        """(B, 1, L, S) bool, True where attention is allowed; (B, 1, 1, S) when only padding matters."""
        batch, length, keys = self.shape
        device = self.key_valid_BS.device
        b = torch.arange(batch, device=device)[:, None, None]
        q = torch.arange(length, device=device)[None, :, None]
        k = torch.arange(keys, device=device)[None, None, :]
        return self.allowed(b, q, k)[:, None]

    def distance(self) -> Tensor:
        """(L, S) float |offset + q - k|: how far apart query and key are in the attended sequence (for ALiBi)."""
        _, length, keys = self.shape
        device = self.key_valid_BS.device
        q = torch.arange(length, device=device)[:, None] + self.offset
        return (q - torch.arange(keys, device=device)[None, :]).abs().float()

    def is_plain(self) -> bool:
        """No padding, documents or spans: only ``causal`` shapes the mask. Syncs with the device."""
        return self.query_docs_BL is None and self.spans_BL is None and bool(self.key_valid_BS.all())

    def runs(self) -> tuple[Tensor, int]:
        """FlashAttention's variable-length form of a self-attention rule without spans or cache offset.

        Every maximal run of tokens of one document (or of padding) in a row is
        one sequence; returns its int32 start offsets into the flattened (B*L)
        tokens, with the total appended (``cu_seqlens``), and the longest run.
        """
        assert self.self_attention and self.offset == 0 and self.spans_BL is None
        batch, length, _ = self.shape
        ids_BL = self.query_docs_BL if self.query_docs_BL is not None else self.query_valid_BL.long() - 1
        starts_BL = torch.ones_like(self.query_valid_BL)
        starts_BL[:, 1:] = ids_BL[:, 1:] != ids_BL[:, :-1]
        starts = starts_BL.flatten().nonzero().flatten()
        total = torch.tensor([batch * length], device=starts.device)
        cu_seqlens = torch.cat([starts, total]).to(torch.int32)
        return cu_seqlens, int(cu_seqlens.diff().max())
