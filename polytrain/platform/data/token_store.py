"""The token store: the text of a prepared split as token ids in flat, memory-mapped files.

As Megatron's and GPT-NeoX's indexed datasets do, each piece is two files: ``<stem>.bin`` holds the ids of
its text parts back to back (uint16 when the vocabulary fits, else uint32) and ``<stem>.idx.npy`` the int64
offset of every part in it (parts + 1 values, the last one the piece's length).  Nothing is read until it is
asked for, a part is a view into the mapped file, and the pages reads touch leave the process every few reads
(``file_map.py``): a process's memory does not grow with the corpus.

A split's pieces (one per shard, see ``shards.py``) together form one stream of documents: read as a language
modeling corpus, ``stream_window`` cuts windows from ``part 0, eos, part 1, eos, ...`` without ever joining it.
"""

import hashlib
from bisect import bisect_right
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from polytrain import atomic
from polytrain.errors import DataError
from polytrain.platform.data.file_map import RELEASE_EVERY, FileMap, Opened, npy_array

SUFFIXES = (".bin", ".idx.npy")
OPEN_PIECES = 128
"""Pieces a store keeps mapped (two files each; the least recently used are unmapped)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of a ``vocab_size`` vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenizer_sha256(tokenizer_json: str) -> str:
    """What a shard records of the tokenizer its text was encoded with: the hash of its ``tokenizer.json``."""
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Piece:
    """One piece of a token store, as a split's index lists it."""

    stem: str
    """File name without the suffixes, relative to the split's folder."""
    parts: int
    tokens: int
    sha256: str
    """Of the ``.bin`` then the ``.idx.npy`` file's bytes."""

    def to_dict(self) -> dict:
        return asdict(self)


def write_piece(folder: Path, stem: str, parts: Sequence[Sequence[int]], dtype: np.dtype) -> Piece:
    """Write ``parts`` (each a sequence of ids) as the piece ``stem`` in ``folder``; each file appears whole."""
    lengths = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((i for p in parts for i in p), dtype=np.int64, count=int(offsets[-1]))
    if len(ids) and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
        raise ValueError(f"token ids {ids.min()}..{ids.max()} do not fit {dtype}")
    data = ids.astype(dtype).tobytes()
    digest = hashlib.sha256(data)
    atomic.write(folder / f"{stem}.bin", lambda tmp: tmp.write_bytes(data))

    def save_index(tmp: Path) -> None:
        with tmp.open("wb") as out:  # np.save on a path would append ".npy" to the temporary name
            np.save(out, offsets)

    atomic.write(folder / f"{stem}.idx.npy", save_index)
    digest.update((folder / f"{stem}.idx.npy").read_bytes())
    return Piece(stem, len(parts), int(offsets[-1]), digest.hexdigest())


def piece_sha256(folder: Path, stem: str) -> str:
    """The hash ``Piece.sha256`` records, of the files as they are now."""
    digest = hashlib.sha256()
    for suffix in SUFFIXES:
        digest.update((folder / f"{stem}{suffix}").read_bytes())
    return digest.hexdigest()


class TokenStore:
    """The pieces of one split, mapped lazily; parts are numbered across pieces in order.

    Memory: two int64 per piece; the pages reads touch leave the process every few reads (``release``).
    """

    def __init__(self, folder: Path, pieces: Sequence[Piece], dtype: np.dtype, vocab_size: int):
        self.folder, self.pieces, self.dtype, self.vocab_size = Path(folder), list(pieces), np.dtype(dtype), vocab_size
        self.part_starts = np.cumsum([0] + [p.parts for p in self.pieces])
        """(pieces + 1,) the number of the first part of each piece."""
        self.stream_starts = np.cumsum([0] + [p.tokens + p.parts for p in self.pieces])
        """(pieces + 1,) where each piece begins in the stream ``part, eos, part, eos, ...``."""
        self._mapped: Opened[int, tuple[np.ndarray, np.ndarray]] = Opened(OPEN_PIECES, self.map_piece)

    @property
    def n_parts(self) -> int:
        return int(self.part_starts[-1])

    @property
    def stream_length(self) -> int:
        """Tokens of the stream with one eos after every part."""
        return int(self.stream_starts[-1])

    def part(self, number: int) -> np.ndarray:
        """The ids of part ``number`` (a read-only view, dtype of the store); ``release`` once it is read."""
        if not 0 <= number < self.n_parts:
            raise IndexError(f"part {number} of {self.n_parts}")
        piece = int(np.searchsorted(self.part_starts, number, side="right")) - 1
        ids, offsets = self._mapped[piece]
        local = number - int(self.part_starts[piece])
        return self.checked(ids[offsets[local]: offsets[local + 1]], piece)

    def stream_window(self, begin: int, length: int, eos_id: int) -> tuple[np.ndarray, list[int]]:
        """Tokens ``begin .. begin + length - 1`` of the stream ``part 0, eos, part 1, eos, ...`` as int64, and
        the offsets in the window at which a part begins (a part begun before the window is not listed)."""
        if begin < 0 or length < 0 or begin + length > self.stream_length:
            raise IndexError(f"window {begin}..{begin + length} of a {self.stream_length}-token stream")
        out = np.empty(length, dtype=np.int64)
        starts, filled, position = [], 0, begin
        piece = int(np.searchsorted(self.stream_starts, position, side="right")) - 1
        while filled < length:
            if not self.pieces[piece].parts:  # every record of its shard was skipped as bad
                piece += 1
                continue
            ids, offsets = self._mapped[piece]
            local = position - int(self.stream_starts[piece])
            # Part j of the piece starts at offsets[j] + j in the piece's stream (one eos after each earlier part).
            j = bisect_right(range(len(offsets) - 1), local, key=lambda k: int(offsets[k]) + k) - 1
            while filled < length and j < len(offsets) - 1:
                part_begin = int(offsets[j]) + j
                if local == part_begin:
                    starts.append(filled)
                part_end = int(offsets[j + 1]) + j  # the part's eos sits here
                take = min(part_end - local, length - filled)
                out[filled: filled + take] = self.checked(ids[offsets[j] + local - part_begin:][:take], piece)
                filled, local = filled + take, local + take
                if filled < length and local == part_end:
                    out[filled] = eos_id
                    filled, local = filled + 1, local + 1
                    j += 1
            piece, position = piece + 1, begin + filled
        self.release()
        return out, starts

    def release(self, every: int = RELEASE_EVERY) -> None:
        """A read is done: ``file_map.Opened.release`` (views stay valid)."""
        self._mapped.release(every)

    def map_piece(self, piece: int) -> tuple[tuple[np.ndarray, np.ndarray], list[FileMap]]:
        """((ids, offsets), their maps) of ``piece``; a file of the wrong size is refused by name."""
        info = self.pieces[piece]
        bin_path, idx_path = (self.folder / f"{info.stem}{s}" for s in SUFFIXES)
        try:
            size = bin_path.stat().st_size
            offsets, offsets_map = npy_array(idx_path)
        except (OSError, ValueError) as err:
            raise DataError(f"{idx_path if bin_path.exists() else bin_path}: unreadable token store piece ({err})") \
                from None
        if size != info.tokens * self.dtype.itemsize:
            raise DataError(f"{bin_path}: {size} bytes, the index of the split says {info.tokens} tokens of "
                            f"{self.dtype.itemsize} bytes: the piece is truncated or was replaced; prepare it again")
        if offsets.shape != (info.parts + 1,) or (info.parts and int(offsets[-1]) != info.tokens):
            last = int(offsets[-1]) if len(offsets) else 0
            raise DataError(f"{idx_path}: {offsets.shape[0]} offsets ending at {last}, the split's index says "
                            f"{info.parts} parts of {info.tokens} tokens; prepare it again")
        if not info.tokens:  # an empty file cannot be mapped
            return (np.zeros(0, self.dtype), offsets), [offsets_map]
        ids_map = FileMap(bin_path)
        return (ids_map.array(self.dtype, info.tokens), offsets), [ids_map, offsets_map]

    def checked(self, ids: np.ndarray, piece: int) -> np.ndarray:
        if len(ids) and int(ids.max()) >= self.vocab_size:
            raise DataError(f"{self.folder / self.pieces[piece].stem}.bin: token id {int(ids.max())} is outside the "
                            f"vocabulary of {self.vocab_size}: the piece is corrupt")
        return ids
