"""Prepared splits: records in Apache Arrow IPC shards, their text in the token store, read by index.

A prepared split is a folder::

    index.json                  what it holds: shards, rows, checksums, the tokenizer's hash (``SplitIndex``)
    tokenizer.json              the tokenizer its text was encoded with
    shard-000000.arrow          records, in Arrow's random-access file format, 64 rows per record batch; its
                                schema's metadata names the tokenizer's hash too
    shard-000000.bin / .idx.npy the ids of that shard's text parts (``token_store.py``)

A row holds a record's parts in order: modality, whether it is scored, the number of its text in the shard's
token piece (-1 for file parts), the file's bytes as they were (encoded: PNG, JPEG, WAV, FLAC ...; empty for
text), two sizes (text: tokens, 0; image: height, width; audio: samples, sample rate; other modalities: bytes,
0) and a CRC-32 of its ids or bytes, checked on every read.  Arrow files are memory-mapped: opening one reads
its footer, a row is a view into the mapping, so reading sample ``i`` of a permutation costs the same whatever
the split's size; the pages reads touch leave the process every few reads (``file_map.py``), so a process's
memory does not grow with the split or with the samples read.
"""

import hashlib
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from polytrain import atomic
from polytrain.errors import DataError
from polytrain.platform.data.file_map import RELEASE_EVERY, FileMap, Opened
from polytrain.platform.data.manifest import Part, Record
from polytrain.platform.data.token_store import Piece, TokenStore, token_dtype, write_piece

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.json"
ROWS_PER_BATCH = 64
"""Rows per Arrow record batch: a writer holds one batch at a time, a reader maps the batch of the row it reads."""
OPEN_SHARDS = 64
"""Shard files a reader keeps mapped (least recently used are closed): file descriptors stay bounded."""
NO_TEXT = -1
"""``text_part`` of a file part."""
SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("where", pa.string()),
    ("label", pa.string()),
    ("modality", pa.list_(pa.string())),
    ("scored", pa.list_(pa.bool_())),
    ("text_part", pa.list_(pa.int64())),
    ("data", pa.list_(pa.binary())),
    ("dim0", pa.list_(pa.int64())),
    ("dim1", pa.list_(pa.int64())),
    ("crc32", pa.list_(pa.int64())),
])
SIZE_COLUMNS = ("modality", "scored", "dim0", "dim1")
TOKENIZER_KEY = "polytrain.tokenizer_sha256"
"""Schema metadata of every shard: the sha256 of the tokenizer its text was encoded with."""


@dataclass(frozen=True)
class PreparedPart(Part):
    """A part as the prepare step writes it: text as token ids, a file as its bytes, and their sizes."""

    dims: tuple[int, int] = (0, 0)
    """text: (tokens, 0); image: (height, width); audio: (samples, sample rate); other modalities: (bytes, 0)."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard, as the split's index lists it."""

    name: str
    rows: int
    sha256: str
    """Of the Arrow file's bytes."""
    tokens: Piece
    skipped: int = 0
    """Bad input records of this shard's share left out (``data.skip_bad_samples``)."""
    documents: bool = True
    """Every input record of this shard's share is one text part (a language-modeling document)."""
    inputs: list[list[str]] = field(default_factory=list)
    """The distinct modality sequences of its records' input (unscored) parts."""

    @staticmethod
    def from_dict(raw: dict) -> "ShardInfo":
        return ShardInfo(**{**raw, "tokens": Piece(**raw["tokens"])})


@dataclass
class SplitIndex:
    """``index.json`` of a prepared split; written by the prepare step after every shard it finishes."""

    tokenizer_sha256: str
    vocab_size: int
    shard_records: int
    """Input records per shard (the last may have fewer; bad records skipped leave fewer too)."""
    source: dict
    """What was prepared (manifest path, size and modification time, task), so a continued prepare can tell."""
    shards: dict[int, ShardInfo] = field(default_factory=dict)
    complete: bool = False
    format: int = FORMAT_VERSION

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards.values())

    @property
    def skipped(self) -> int:
        """Bad input records left out (``data.skip_bad_samples``)."""
        return sum(s.skipped for s in self.shards.values())

    @property
    def documents(self) -> bool:
        """Every record is one text part: the split reads as a language-modeling stream (``TokenStore``)."""
        return all(s.documents for s in self.shards.values())

    @property
    def inputs(self) -> set[tuple[str, ...]]:
        """The distinct modality sequences of the records' input (unscored) parts."""
        return {tuple(kind) for s in self.shards.values() for kind in s.inputs}

    def write(self, folder: Path) -> None:
        raw = {**asdict(self), "shards": {str(k): asdict(v) for k, v in sorted(self.shards.items())}}
        atomic.write_text(folder / INDEX_FILE, json.dumps(raw, indent=1) + "\n")

    @staticmethod
    def read(folder: Path) -> "SplitIndex":
        path = Path(folder) / INDEX_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            raw["shards"] = {int(k): ShardInfo.from_dict(v) for k, v in raw["shards"].items()}
            index = SplitIndex(**raw)
        except FileNotFoundError:
            raise DataError(f"{folder}: not a prepared split (no {INDEX_FILE}); make one with polytrain data "
                            f"prepare") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: unreadable index of a prepared split ({err})") from None
        if index.format != FORMAT_VERSION:
            raise DataError(f"{path}: format {index.format}; this polytrain reads format {FORMAT_VERSION}, prepare "
                            f"the data again")
        return index


def is_prepared(path: Path) -> bool:
    """Whether ``path`` is a prepared split's folder (else a manifest file)."""
    return (Path(path) / INDEX_FILE).is_file()


def shard_stem(number: int) -> str:
    return f"shard-{number:06d}"


def crc32(value: bytes | np.ndarray) -> int:
    return zlib.crc32(value.tobytes() if isinstance(value, np.ndarray) else value)


def write_shard(folder: Path, number: int, records: Sequence[Record], vocab_size: int, tokenizer: str,
                skipped: int = 0, documents: bool = True) -> ShardInfo:
    """Shard ``number`` of ``records`` (parts ``PreparedPart``, text encoded by the tokenizer of sha256
    ``tokenizer``, which the shard's schema records) and its token piece, in ``folder``; each file appears whole
    or not at all."""
    dtype, stem = token_dtype(vocab_size), shard_stem(number)
    texts: list[Sequence[int]] = []
    path = folder / f"{stem}.arrow"

    def rows(batch: Sequence[Record]) -> pa.RecordBatch:
        columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        for record in batch:
            cols = {k: [] for k in ("modality", "scored", "text_part", "data", "dim0", "dim1", "crc32")}
            for part in record.parts:
                text = part.modality == "text"
                cols["modality"].append(part.modality)
                cols["scored"].append(part.scored)
                cols["text_part"].append(len(texts) if text else NO_TEXT)
                cols["data"].append(b"" if text else bytes(part.value))
                cols["dim0"].append(part.dims[0])
                cols["dim1"].append(part.dims[1])
                cols["crc32"].append(crc32(np.asarray(part.value, dtype=dtype) if text else part.value))
                if text:
                    texts.append(part.value)
            for key, values in (("sample_id", record.sample_id), ("where", record.where), ("label", record.label),
                                *cols.items()):
                columns[key].append(values)
        return pa.RecordBatch.from_pydict(columns, schema=SCHEMA)

    def produce(tmp: Path) -> None:
        schema = SCHEMA.with_metadata({TOKENIZER_KEY: tokenizer})
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for start in range(0, len(records), ROWS_PER_BATCH):
                writer.write_batch(rows(records[start: start + ROWS_PER_BATCH]))

    atomic.write(path, produce)
    piece = write_piece(folder, stem, texts, dtype)
    inputs = sorted({tuple(p.modality for p in r.parts if not p.scored) for r in records})
    return ShardInfo(path.name, len(records), file_sha256(path), piece, skipped, documents, [list(k) for k in inputs])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PreparedSplit:
    """A prepared split read by record index (a sequence of manifest ``Record``); shards are mapped when first read.

    Memory: a few numbers per shard; a reader keeps at most ``OPEN_SHARDS`` files mapped.
    """

    def __init__(self, folder: str | Path, tokenizer_sha256: str | None = None):
        self.folder = Path(folder)
        self.index = index = SplitIndex.read(self.folder)
        if not index.complete:
            raise DataError(f"{self.folder}: the prepare of this split did not finish ({len(index.shards)} shard(s) "
                            f"done); run polytrain data prepare again to continue it")
        if tokenizer_sha256 is not None and tokenizer_sha256 != index.tokenizer_sha256:
            raise DataError(f"{self.folder}: prepared with the text tokenizer sha256 {index.tokenizer_sha256}, but "
                            f"this run's tokenizer is sha256 {tokenizer_sha256}; train with the split's own "
                            f"{TOKENIZER_FILE} or prepare the data again with this tokenizer")
        self.shards = [index.shards[k] for k in sorted(index.shards)]
        self.row_starts = np.cumsum([0] + [s.rows for s in self.shards])
        self.dtype = token_dtype(index.vocab_size)
        self.tokens = TokenStore(self.folder, [s.tokens for s in self.shards], self.dtype, index.vocab_size)
        self._open: Opened[int, pa.ipc.RecordBatchFileReader] = Opened(OPEN_SHARDS, self.open_shard)
        if not len(self):
            raise DataError(f"{self.folder}: a prepared split with no samples")

    def __len__(self) -> int:
        return int(self.row_starts[-1])

    def __getitem__(self, index: int) -> Record:
        """Record ``index``: text parts as their token ids (a tuple), file parts as their bytes; its ``where``
        names the shard and the member, then the manifest line it was prepared from."""
        shard, row, batch, where = self.locate(index)
        try:
            raw = batch.slice(row % ROWS_PER_BATCH, 1).to_pylist()[0]
        except pa.ArrowException as err:
            raise DataError(f"{where}: unreadable member ({err}): the shard is corrupt") from None
        member = f"{where} ({raw['sample_id']}, from {raw['where']})"
        first_part = int(self.tokens.part_starts[shard])
        parts = []
        for k, (modality, scored, text, data, crc) in enumerate(zip(
                *(raw[c] for c in ("modality", "scored", "text_part", "data", "crc32")))):
            value = self.tokens.part(first_part + text) if text != NO_TEXT else data
            if crc32(value) != crc:
                raise DataError(f"{member}: {modality} part {k} fails its checksum: the shard is corrupt; "
                                f"prepare it again")
            parts.append(Part(modality, tuple(value.tolist()) if text != NO_TEXT else value, scored))
        self.release()
        return Record(tuple(parts), raw["label"], raw["sample_id"], member)

    def sizes(self, index: int) -> list[tuple[str, bool, int, int]]:
        """(modality, scored, dim0, dim1) of each part of record ``index``, without reading its data."""
        _, row, batch, where = self.locate(index)
        k = row % ROWS_PER_BATCH
        try:
            columns = [batch.column(name)[k].as_py() for name in SIZE_COLUMNS]
        except pa.ArrowException as err:
            raise DataError(f"{where}: unreadable member ({err}): the shard is corrupt") from None
        self.release()
        return list(zip(*columns))

    def release(self, every: int = RELEASE_EVERY) -> None:
        """A read is done: ``file_map.Opened.release`` of the shards and of the token store."""
        self._open.release(every)
        self.tokens.release(every)

    def locate(self, index: int) -> tuple[int, int, pa.RecordBatch, str]:
        """(shard, row in it, its record batch, ``<shard file>: member <row>``) of record ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        shard = int(np.searchsorted(self.row_starts, index, side="right")) - 1
        row = index - int(self.row_starts[shard])
        path = self.folder / self.shards[shard].name
        where = f"{path}: member {row}"
        reader = self._open[shard]
        try:
            return shard, row, reader.get_batch(row // ROWS_PER_BATCH), where
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{where}: unreadable record batch ({err}): the shard is corrupt") from None

    def open_shard(self, shard: int) -> tuple[pa.ipc.RecordBatchFileReader, list[FileMap]]:
        """The reader of ``shard`` and its map, once its schema, rows and tokenizer are checked."""
        info = self.shards[shard]
        path = self.folder / info.name
        try:
            mapped = FileMap(path)
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapped.map)))
        except (pa.ArrowException, OSError, ValueError) as err:  # ValueError: an empty file cannot be mapped
            raise DataError(f"{path}: not a readable Arrow shard ({err}); it is truncated or corrupt, prepare it "
                            f"again") from None
        if reader.schema != SCHEMA or sum(reader.get_batch(b).num_rows for b in range(reader.num_record_batches)) \
                != info.rows:
            raise DataError(f"{path}: not the shard the split's index lists ({info.rows} rows of polytrain's "
                            f"schema); prepare it again")
        encoded_by = (reader.schema.metadata or {}).get(TOKENIZER_KEY.encode(), b"").decode()
        if encoded_by != self.index.tokenizer_sha256:
            raise DataError(f"{path}: encoded with the text tokenizer sha256 {encoded_by or '(none recorded)'}, the "
                            f"split's is sha256 {self.index.tokenizer_sha256}: a shard of another prepare; prepare "
                            f"the split again")
        return reader, [mapped]
