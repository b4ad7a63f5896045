"""Sequence assembly: a sample's segments laid out as the model reads them, and rows of them collated.

A text part becomes its token ids; a non-text part becomes a span: its
modality's opening marker, one slot per token (filled by that modality's
embedder), its closing marker; or, without markers
(``tokenizers.text.span_markers: false``, LLaVA's layout), its slots alone,
each holding the modality's token.  A sequence whose only part is one file (an
image to caption or classify) is read as that modality's tokens alone, with no
markers, as an encoder reads a ViT or Whisper input.

Packed rows (``packing: true``) hold several samples one after another, each
its own document: attention stays inside a document (``Segment.documents``)
and positions restart at every sample, so a packed row computes what the
samples would alone.

Shape legend: B rows, L row length, N spans, S span length.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from polytrain.tokens import IGNORE_INDEX, Segment, Spans, Tokens


@dataclass
class Laid:
    """One sequence: text ids (a placeholder at each span slot), which of them are scored, and the spans."""

    ids: list[int] = field(default_factory=list)
    scored: list[bool] = field(default_factory=list)
    spans: list[tuple[str, Tokens, int]] = field(default_factory=list)
    """(modality, tokens, index of the span's first slot in ``ids``)."""
    marked: int = 1
    """Marker slots on each side of a span: 1 (``<image>`` ... ``</image>``), or 0 (the slots alone)."""

    def __len__(self) -> int:
        return len(self.ids)

    def add_text(self, ids: list[int], scored: bool = False) -> None:
        self.ids += ids
        self.scored += [scored] * len(ids)

    def add_span(self, modality: str, tokens: Tokens, markers: tuple[int, int] | None, placeholder: int) -> None:
        """The span's slots, each holding ``placeholder``, between ``markers`` (None: none)."""
        self.marked = int(markers is not None)
        self.add_text(list(markers[:1]) if markers else [])
        self.spans.append((modality, tokens, len(self.ids)))
        self.add_text([placeholder] * len(tokens))
        self.add_text(list(markers[1:]) if markers else [])

    def copy(self) -> "Laid":
        return Laid(list(self.ids), list(self.scored), list(self.spans), self.marked)

    def cut(self, length: int) -> "Laid":
        """The first ``length`` slots; a span the cut would split is dropped whole, with everything after it."""
        for _, tokens, start in self.spans:
            if start + len(tokens) + self.marked > length:  # the span and its closing marker must fit
                length = min(length, start - self.marked)  # from its opening marker on
                break
        return Laid(self.ids[:length], self.scored[:length], [s for s in self.spans if s[2] < length], self.marked)

    def shifted(self) -> tuple["Laid", list[int]]:
        """Next-token training pair: all slots but the last as input, and each position's label, the token after
        it where that token is scored (else ``IGNORE_INDEX``)."""
        inputs = self.cut(len(self) - 1)
        labels = [token if scored else IGNORE_INDEX for token, scored in zip(self.ids[1:], self.scored[1:])]
        return inputs, labels[: len(inputs)]


@dataclass
class Plain:
    """A sequence that is one file's tokens alone (one image, one clip)."""

    modality: str
    tokens: Tokens

    def __len__(self) -> int:
        return len(self.tokens)


def first_fit(sizes: list[tuple[int, ...]], budgets: tuple[int, ...]) -> list[list[int]]:
    """Sample indices grouped into rows: each sample has a size per budget (encoder and decoder slots, say),
    and a row's sizes add up to at most the budgets. Largest first, each into the first row it fits."""
    rows: list[list[int]] = []
    room: list[list[int]] = []
    for index in sorted(range(len(sizes)), key=lambda i: (tuple(-n for n in sizes[i]), i)):
        for row, left in enumerate(room):
            if all(n <= free for n, free in zip(sizes[index], left)):
                rows[row].append(index)
                room[row] = [free - n for n, free in zip(sizes[index], left)]
                break
        else:
            rows.append([index])
            room.append([budget - n for n, budget in zip(sizes[index], budgets)])
    return rows


def collate_rows(rows: list[list[Laid | Plain]], pad_id: int, multiple: int = 1) -> Segment:
    """Rows of one or more sequences (several: a packed row, each its own document) as one padded Segment."""
    if all(isinstance(item, Plain) for row in rows for item in row):
        return collate_plain(rows, multiple)
    packed = any(len(row) > 1 for row in rows)
    length = pad_length(max(sum(len(item) for item in row) for row in rows), multiple)
    values = torch.full((len(rows), length), pad_id, dtype=torch.long)
    columns = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    documents = torch.full((len(rows), length), -1, dtype=torch.long) if packed else None
    spans: dict[str, list[tuple[Tokens, int, int]]] = {}
    for r, row in enumerate(rows):
        offset = 0
        for doc, item in enumerate(row):
            assert isinstance(item, Laid), "a packed row holds laid-out sequences"
            n = len(item)
            values[r, offset: offset + n] = torch.tensor(item.ids, dtype=torch.long)
            columns[r, offset: offset + n] = torch.arange(n)  # positions restart with every document
            mask[r, offset: offset + n] = True
            if documents is not None:
                documents[r, offset: offset + n] = doc
            for modality, tokens, start in item.spans:
                spans.setdefault(modality, []).append((tokens, r, offset + start))
            offset += n
    positions = torch.stack([torch.zeros_like(columns), columns], dim=-1)
    return Segment(values, positions, mask, "text", documents,
                   {m: Spans(Segment.collate([t for t, _, _ in items]), torch.tensor([r for _, r, _ in items]),
                             torch.tensor([s for _, _, s in items])) for m, items in sorted(spans.items())})


def left_aligned(segment: Segment) -> Segment:
    """Each row moved right so that it ends at the last column (prompts for batched generation); its spans
    move with it."""
    length = segment.values.shape[1]
    shift_B = length - segment.mask.sum(1)
    source_BL = torch.arange(length)[None, :] - shift_B[:, None]  # where each new slot's token comes from
    real_BL = source_BL >= 0
    take_BL = source_BL.clamp(min=0)

    def move(t: Tensor, fill) -> Tensor:
        index = take_BL.view(*take_BL.shape, *([1] * (t.dim() - 2))).expand_as(t)
        moved = t.gather(1, index)
        mask = real_BL.view(*real_BL.shape, *([1] * (t.dim() - 2)))
        return torch.where(mask, moved, torch.as_tensor(fill, dtype=t.dtype))

    spans = {m: Spans(s.tokens, s.rows, torch.where(s.rows >= 0, s.starts + shift_B[s.rows.clamp(min=0)], s.starts))
             for m, s in segment.spans.items()}
    return Segment(move(segment.values, 0), move(segment.positions, 0),
                   move(segment.mask, False), segment.modality,
                   None if segment.documents is None else move(segment.documents, -1), spans)


def collate_plain(rows: list[list[Plain]], multiple: int) -> Segment:
    assert all(len(row) == 1 for row in rows), "single-file sequences are not packed"
    segment = Segment.collate([row[0].tokens for row in rows])
    extra = pad_length(segment.values.shape[1], multiple) - segment.values.shape[1]
    if not extra:
        return segment
    return Segment(F.pad(segment.values, (0, 0) * (segment.values.dim() - 2) + (0, extra)),
                   F.pad(segment.positions, (0, 0, 0, extra)), F.pad(segment.mask, (0, extra)), segment.modality)


def collate_labels(rows: list[list[list[int]]], length: int) -> Tensor:
    """(B, length) labels: each row's documents' labels one after another, ``IGNORE_INDEX`` at padding."""
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for r, row in enumerate(rows):
        flat = [label for document in row for label in document]
        labels[r, : len(flat)] = torch.tensor(flat, dtype=torch.long)
    return labels


def pad_length(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple
