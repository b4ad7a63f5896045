"""Independent references the model tests compare against: attention and its mask written out longhand."""

import math

import torch
from torch import Tensor

from polytrain.models.attention_mask import MaskRule

MASK_CASES = {
    "padding": dict(),
    "causal_padding": dict(causal=True),
    "prefix_lm": dict(causal=True, spans=((0, 4),)),
    "two_spans": dict(causal=True, spans=((0, 2), (3, 5))),
    "packed_documents": dict(causal=True, docs=True),
    "packed_bidirectional": dict(docs=True),
}
"""Named attention masks: ``MaskRule`` options, with ``docs=True`` for packed documents and ``spans`` the
(start, end) columns of bidirectional spans in every row."""


def allowed_by_loops(key_valid: Tensor, query_valid: Tensor, causal: bool = False, offset: int = 0,
                     docs_q: Tensor | None = None, docs_k: Tensor | None = None, self_attention: bool = True,
                     spans: tuple[tuple[int, int], ...] = ()) -> Tensor:
    """(B, L, S) bool, one Python comparison per query/key pair, from the rule as the docs state it."""
    batch, length = query_valid.shape
    keys = key_valid.shape[1]
    out = torch.zeros(batch, length, keys, dtype=torch.bool)
    for b in range(batch):
        for q in range(length):
            for k in range(keys):
                ok = bool(key_valid[b, k])
                same_span = any(start <= q < end and start <= k < end for start, end in spans)
                if causal and not (k <= offset + q or same_span):
                    ok = False
                if docs_q is not None and bool(query_valid[b, q]) and docs_q[b, q] != docs_k[b, k]:
                    ok = False
                if self_attention and k == offset + q:
                    ok = True
                out[b, q, k] = ok
    return out


def mask_rule(name: str, valid_BL: Tensor, docs_BL: Tensor) -> MaskRule:
    """Self-attention rule ``name`` of ``MASK_CASES`` over these rows (``docs_BL``: each token's document)."""
    opts = dict(MASK_CASES[name])
    docs = docs_BL if opts.pop("docs", False) else None
    spans, spans_BL = opts.pop("spans", ()), None
    if spans:
        spans_BL = torch.full(valid_BL.shape, -1, dtype=torch.long)
        for index, (start, end) in enumerate(spans):
            spans_BL[:, start:end] = index
    return MaskRule(valid_BL, valid_BL, query_docs_BL=docs, key_docs_BS=docs, spans_BL=spans_BL, **opts)


def mask_case(name: str, valid_BL: Tensor, docs_BL: Tensor) -> tuple[MaskRule, Tensor]:
    """``mask_rule(name, ...)``, and the same rule by ``allowed_by_loops``."""
    opts = dict(MASK_CASES[name])
    docs = docs_BL if opts.pop("docs", False) else None
    return mask_rule(name, valid_BL, docs_BL), allowed_by_loops(valid_BL, valid_BL, docs_q=docs, docs_k=docs, **opts)


def reference_attention(q_BLHD: Tensor, k_BSGD: Tensor, v_BSGD: Tensor, allowed_BLS: Tensor,
                        bias_HLS: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D) + bias, disallowed -> -inf) v in float64; key/value heads shared by query groups."""
    q, k, v = (t.double() for t in (q_BLHD, k_BSGD, v_BSGD))
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores_BHLS = torch.einsum("blhd,bshd->bhls", q, k) / math.sqrt(q.shape[-1])
    if bias_HLS is not None:
        scores_BHLS = scores_BHLS + bias_HLS.double()
    scores_BHLS = scores_BHLS.masked_fill(~allowed_BLS[:, None], float("-inf"))
    return torch.einsum("bhls,bshd->blhd", scores_BHLS.softmax(-1), v)
