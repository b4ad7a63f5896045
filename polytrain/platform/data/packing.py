"""Windows over a document stream for language modeling: documents joined by eos, cut into fixed windows, boundaries kept.

Every token of a window knows its document (``Tokens.documents``, numbered
from 0 in each window) and its position counts from that document's start, or
from the window's start for a document that began in an earlier window.  So a
model can keep attention inside a document and position embeddings never see
a number larger than the window.
"""

from typing import Iterable, Sequence

import torch
from torch import Tensor

from polytrain.errors import DataError
from polytrain.tokens import Tokens


class PackedDocuments:
    """Windows over the stream ``doc 0, eos, doc 1, eos, ...``; window ``i`` starts at token ``i * stride``.

    For next-token training use ``window = seq_len + 1`` and ``stride = seq_len``: consecutive windows share one
    token, so every token of the stream is a label exactly once (see ``next_token_pair``).
    """

    def __init__(self, documents: Iterable[Sequence[int]], eos_id: int, window: int, stride: int | None = None):
        stream, starts = [], []
        for ids in documents:
            starts.append(len(stream))
            stream.extend(ids)
            stream.append(eos_id)
        self.set_stream(torch.tensor(stream, dtype=torch.int32), torch.tensor(starts, dtype=torch.int64), window,
                        stride)
        if len(self) == 0:
            raise DataError(f"{len(stream)} tokens from {len(starts)} document(s), fewer than one window of {window}")

    @classmethod
    def from_stream(cls, tokens: Tensor, eos_id: int, window: int, stride: int | None = None) -> "PackedDocuments":
        """Windows over a stream already joined (every document followed by eos); a document starts after each
        eos. May hold no window (``len`` 0) when the stream is too short."""
        ends = (tokens == eos_id).nonzero().flatten()
        starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends[:-1].long() + 1])
        windows = cls.__new__(cls)
        windows.set_stream(tokens, starts, window, stride)
        return windows

    def set_stream(self, tokens: Tensor, starts: Tensor, window: int, stride: int | None) -> None:
        stride = window if stride is None else stride
        if window < 2 or not 0 < stride <= window:
            raise ValueError(f"window={window} must be >= 2 and stride={stride} in 1..window")
        self.tokens = tokens
        """(N,) the whole stream; int32 halves the memory of a large corpus, windows come out as int64."""
        self.starts = starts
        """(documents,) offset of each document's first token in the stream."""
        self.window, self.stride = window, stride

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - self.window) // self.stride + 1)

    def __getitem__(self, index: int) -> Tokens:
        """Window ``index``: values (window,), positions (window, 2) as (0, offset in document), documents (window,)."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        begin = index * self.stride
        offsets = torch.arange(begin, begin + self.window)
        document = torch.searchsorted(self.starts, offsets, right=True) - 1  # last start <= offset
        document_start = self.starts[document].clamp(min=begin)
        positions = torch.stack([torch.zeros_like(offsets), offsets - document_start], dim=1)
        return Tokens(self.tokens[begin: begin + self.window].long(), positions, "text", document - document[0])


def next_token_pair(window: Tokens) -> tuple[Tokens, Tensor]:
    """(inputs, labels) of a packed window: tokens ``0..L-2`` with their positions and documents, ids ``1..L-1``.

    A document's eos is labeled with the next document's first token, as on an unpacked stream; only attention
    (through ``documents``) and positions respect the boundary.
    """
    documents = None if window.documents is None else window.documents[:-1]
    inputs = Tokens(window.values[:-1], window.positions[:-1], window.modality, documents)
    return inputs, window.values[1:]


class StoreWindows:
    """``PackedDocuments``'s windows over a prepared split's token store (``token_store.TokenStore``): the same
    tokens, positions and documents, read from the mapped files window by window instead of held in memory."""

    def __init__(self, store, eos_id: int, window: int, stride: int):
        if window < 2 or not 0 < stride <= window:
            raise ValueError(f"window={window} must be >= 2 and stride={stride} in 1..window")
        self.store, self.eos_id, self.window, self.stride = store, eos_id, window, stride

    def __len__(self) -> int:
        return max(0, (self.store.stream_length - self.window) // self.stride + 1)

    def __getitem__(self, index: int) -> Tokens:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        ids, starts = self.store.stream_window(index * self.stride, self.window, self.eos_id)
        begins = torch.zeros(self.window, dtype=torch.bool)
        begins[starts] = True
        offsets = torch.arange(self.window)
        document_start = torch.cummax(torch.where(begins, offsets, 0), dim=0).values
        documents = torch.cumsum(begins[1:].long(), dim=0)
        positions = torch.stack([torch.zeros_like(offsets), offsets - document_start], dim=1)
        return Tokens(torch.from_numpy(ids), positions, "text", torch.cat([documents.new_zeros(1), documents]))
