"""The one contract between tokenizers and models.

Every modality tokenizer turns a raw sample into ``Tokens``; collation pads a
list of them into a ``Segment``; every embedder turns a ``Segment`` into
``(B, L, dim)``.  The backbone never looks at which modality it got.

A sequence that mixes modalities (an image, then a question, then its answer)
is a text ``Segment`` whose ``spans`` hold the non-text parts: each span's
tokens are embedded by its modality's embedder and placed at its slots in the
text sequence, which hold a placeholder id there.

Shape legend: B batch, L sequence length, D features per patch, N spans, S span length.
"""

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor

IGNORE_INDEX = -100
"""Label value that the loss skips (padding, positions with no target)."""


@dataclass(frozen=True)
class EmbedSpec:
    """What an embedder must know about one modality's tokens to size its tables."""

    modality: str
    input_dim: int
    """Vocabulary size for discrete ids, features per patch for continuous patches."""
    grid: tuple[int, int]
    """Largest (rows, cols) position the tokenizer emits; text is one row of ``max_len`` columns."""


@dataclass
class Tokens:
    """One sample of one modality."""

    values: Tensor
    """(L,) int64 token ids, or (L, D) float32 patch features."""
    positions: Tensor
    """(L, 2) int64 (row, col) on the modality's grid; text uses row 0."""
    modality: str
    documents: Tensor | None = None
    """(L,) int64 document index of each token when several documents are packed into one
    sequence; attention must stay within a document. None: the whole sequence is one document."""

    def __len__(self) -> int:
        return self.values.shape[0]


@dataclass
class Spans:
    """The non-text spans of one modality in a batch of mixed sequences, and where each one goes."""

    tokens: "Segment"
    """(N, S, ...) the spans' tokens, padded, as their embedder reads them."""
    rows: Tensor
    """(N,) int64: the sequence row of each span; -1 marks a stand-in that is embedded but placed nowhere (so
    every rank runs every embedder of a task, whatever its micro-batch holds)."""
    starts: Tensor
    """(N,) int64: the position in its row of each span's first token."""

    def apply(self, fn: Callable[[Tensor], Tensor]) -> "Spans":
        """The same spans with ``fn`` applied to every tensor (a move to a device, pinning)."""
        return Spans(self.tokens.apply(fn), fn(self.rows), fn(self.starts))


@dataclass
class Segment:
    """A padded batch of ``Tokens`` of one modality (a text one may carry non-text ``spans``)."""

    values: Tensor
    """(B, L) int64 ids or (B, L, D) float patches."""
    positions: Tensor
    """(B, L, 2) int64."""
    mask: Tensor
    """(B, L) bool, True at real tokens, False at padding."""
    modality: str
    documents: Tensor | None = None
    """(B, L) int64 document index per token for packed rows (padding gets -1); None: one document per row."""
    spans: dict[str, Spans] = field(default_factory=dict)
    """Text segments only: non-text spans by modality, placed over the placeholder ids at their slots."""

    @staticmethod
    def collate(items: list[Tokens], pad_value: float = 0) -> "Segment":
        """Right-pad ``items`` (all of one modality) to the longest one."""
        modality = items[0].modality
        assert all(t.modality == modality for t in items), "one Segment holds one modality"
        length = max(len(t) for t in items)
        values = items[0].values.new_full((len(items), length, *items[0].values.shape[1:]), pad_value)
        positions = torch.zeros(len(items), length, 2, dtype=torch.long)
        mask = torch.zeros(len(items), length, dtype=torch.bool)
        packed = any(t.documents is not None for t in items)
        documents = torch.full((len(items), length), -1, dtype=torch.long) if packed else None
        for i, t in enumerate(items):
            values[i, : len(t)] = t.values
            positions[i, : len(t)] = t.positions
            mask[i, : len(t)] = True
            if packed:
                documents[i, : len(t)] = 0 if t.documents is None else t.documents
        return Segment(values, positions, mask, modality, documents)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> "Segment":
        """The same segment with ``fn`` applied to every tensor (a move to a device, pinning)."""
        return replace(self, values=fn(self.values), positions=fn(self.positions), mask=fn(self.mask),
                       documents=None if self.documents is None else fn(self.documents),
                       spans={modality: spans.apply(fn) for modality, spans in self.spans.items()})


@dataclass
class TaskBatch:
    """One task's share of a micro-batch: what a head consumes, plus bookkeeping."""

    inputs: Segment
    """What the head reads first: the decoder's text (teacher forcing), or the encoder's input (classifier,
    masked_lm); a text segment may carry non-text spans."""
    labels: Tensor
    """(B, T) int64 token targets (next tokens, or masked originals), ``IGNORE_INDEX`` where no loss; (B,)
    class ids for a classifier."""
    source: Segment | None = None
    """The encoder's input for encoder-decoder tasks; None otherwise."""
    sample_ids: list[str] = field(default_factory=list)
    """Where each row came from (``manifest:line``), for logs and resume checks."""
    targets: list[str] = field(default_factory=list)
    """Reference target strings (scored text, or class names), for evaluation metrics."""
    prompt: Segment | None = None
    """decoder_only: each sample's sequence before its scored text (left-padded; a row per sample, packed or
    not), for generation."""
    bidirectional_spans: bool = False
    """decoder_only: the tokens of each non-text span see each other whole (prefix-LM)."""

    def apply(self, fn: Callable[[Tensor], Tensor]) -> "TaskBatch":
        """The same batch with ``fn`` applied to every tensor."""
        return replace(self, inputs=self.inputs.apply(fn), labels=fn(self.labels),
                       source=None if self.source is None else self.source.apply(fn),
                       prompt=None if self.prompt is None else self.prompt.apply(fn))

    def to(self, device: torch.device | str) -> "TaskBatch":
        """On ``device``; from pinned memory (``pin_memory``) the copy to a GPU runs asynchronously."""
        return self.apply(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> "TaskBatch":
        """In page-locked memory, for asynchronous copies to the GPU (the loader's pinning thread calls it)."""
        return self.apply(Tensor.pin_memory)

    def __len__(self) -> int:
        return self.labels.shape[0]


def text_tokens(ids: list[int] | Tensor, modality: str = "text") -> Tokens:
    """Token ids laid out on one row: positions (0, 0), (0, 1), ..."""
    values = torch.as_tensor(ids, dtype=torch.long)
    positions = torch.stack([torch.zeros_like(values), torch.arange(len(values))], dim=1)
    return Tokens(values, positions, modality)
