"""Sequence sharding: which part of every sequence this device computes; the whole of it by default.

Under sequence parallelism (``engine.sequence_parallel``: DeepSpeed-Ulysses) the ``size`` devices of a group
read the same samples and each computes a contiguous slice of every sequence: rank ``r`` the tokens
``[r * L/size, (r + 1) * L/size)``.  The model consults its ``SequenceShard`` at a few points, each the
identity for the default one (``WHOLE``):

- ``pad``: the embedded sequence is padded at its end to a multiple of ``size`` with tokens no query sees;
- ``split``: a stack keeps this device's slice of the token vectors and of the RoPE angles.  What decides the
  masks (validity, causality, prefix-LM spans, packed documents, ALiBi distances) stays whole, and positions
  (learned, sinusoidal, RoPE 1-D and 2-D) are computed for the whole sequence before the split, so each
  slice carries its own offsets and every mask is the whole sequence's, exactly;
- ``attention``: around the attention kernel, an exchange turns this device's slice of the sequence with
  every head into the whole sequence with a slice of the heads, and back; ``heads`` takes that slice of a
  per-head value (ALiBi slopes);
- ``gather``: the whole sequence again, for a head that pools over it (the classifier);
- ``labels``: this device's slice of the token labels (padded like the tokens); a per-sample label (a
  class) goes with the sample's first token, to rank 0.

Only training forwards are sharded: evaluation and generation run whole on every device.  The exchanges
are collectives, so they live in ``platform/distributed/sequence_parallel.py``; this class holds the
arithmetic, and models/ stays single-device PyTorch.

Shape legend: B batch, L length, E model dim, H heads, P rotation pairs.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from polytrain.models.embed import Embedded
from polytrain.tokens import IGNORE_INDEX


class SequenceShard:
    """Slice ``rank`` of ``size`` of every sequence; ``SequenceShard()`` is the whole sequence."""

    def __init__(self, size: int = 1, rank: int = 0):
        assert 0 <= rank < size
        self.size, self.rank = size, rank

    def padded(self, length: int) -> int:
        """``length`` rounded up to a multiple of ``size``."""
        return -(-length // self.size) * self.size

    def pad(self, e: Embedded) -> Embedded:
        """``e`` with invalid tokens appended up to a multiple of ``size`` (unrotated, in no document or span)."""
        extra = self.padded(e.length) - e.length
        if not extra:
            return e
        rope = None
        if e.rope is not None:
            cos, sin = e.rope
            rope = (F.pad(cos, (0, 0, 0, extra), value=1.0), F.pad(sin, (0, 0, 0, extra)))
        return Embedded(F.pad(e.x_BLE, (0, 0, 0, extra)), F.pad(e.valid_BL, (0, extra)),
                        None if e.documents_BL is None else F.pad(e.documents_BL, (0, extra), value=-1), rope,
                        None if e.spans_BL is None else F.pad(e.spans_BL, (0, extra), value=-1))

    def split(self, t_BL: Tensor) -> Tensor:
        """This device's slice of ``t_BL`` along dim 1 (whose length is a multiple of ``size``)."""
        if self.size == 1:
            return t_BL
        chunk = t_BL.shape[1] // self.size
        return t_BL.narrow(1, self.rank * chunk, chunk)

    def split_rope(self, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
        """This device's slice of the (cos, sin) angles, (B, L/size, P) each."""
        return None if rope is None else (self.split(rope[0]), self.split(rope[1]))

    def labels(self, labels: Tensor) -> Tensor:
        """Token labels (B, T): this slice of them padded like the tokens; per-sample labels (B,): rank 0's."""
        if self.size == 1:
            return labels
        if labels.dim() == 1:
            return labels if self.rank == 0 else torch.full_like(labels, IGNORE_INDEX)
        extra = self.padded(labels.shape[1]) - labels.shape[1]
        return self.split(F.pad(labels, (0, extra), value=IGNORE_INDEX))

    def heads(self, t_H: Tensor | None) -> Tensor | None:
        """This device's slice of a per-head tensor: the heads its attention computes."""
        if t_H is None or self.size == 1:
            return t_H
        chunk = t_H.shape[0] // self.size
        return t_H[self.rank * chunk: (self.rank + 1) * chunk]

    def attention(self, plan):
        """``plan`` (an ``AttentionPlan``, or anything called as one) with the exchanges around it."""
        assert self.size == 1, "a sequence split over devices needs the exchanges of a distributed shard"
        return plan

    def gather(self, x_BLE: Tensor) -> Tensor:
        """The whole sequence (B, L, E) from every device's slice."""
        assert self.size == 1, "a sequence split over devices needs the gather of a distributed shard"
        return x_BLE


WHOLE = SequenceShard()
"""The whole sequence on this device: no sequence parallelism."""
