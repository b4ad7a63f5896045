"""Datasets, task mixing, distributed + resumable sampling and collation.

Manifest format (JSONL, one sample per line, UTF-8)::

    {"text": "def f():\\n    return 1\\n"}                          decoder-only (LM) sample
    {"image": "imgs/0001.png", "target": "seven"}                  image -> text
    {"audio": "clips/s03_7.wav", "target": "seven", "id": "s03_7"} audio -> text
    {"text": "good morning", "target": "bonjour"}                  text -> text

Fields: ``text`` (inline string), ``image`` / ``audio`` (file path, relative
to the manifest's folder or absolute; a plugin modality's name works the same
way), ``target`` (text the model must
produce), ``id`` (optional; defaults to ``<manifest>:<line>``) and ``task``
(optional; when present, only the task of that name reads the line, so one
manifest may serve several tasks).  Blank lines are ignored.

A manifest is named in ``data.tasks.<task>.train`` / ``.val`` by path, or as
``builtin:<name>/<split>`` for the embedded datasets (see ``builtin.py``).

Micro-batches are planned by ``Schedule`` per global slot (see its docstring),
so the data order does not depend on how many processes read it.
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from polytrain.errors import ConfigError, DataError, PolytrainError
from polytrain.models.heads import HEADS
from polytrain.tokenizers import TOKENIZERS
from polytrain.tokenizers.overflow import Overflow
from polytrain.tokenizers.text import TextTokenizer, check_unicode
from polytrain.tokens import IGNORE_INDEX, Segment, TaskBatch, Tokens, text_tokens

log = logging.getLogger(__name__)

SAMPLE_FIELDS = ("text", "image", "audio", "target", "id", "task")
MAX_SKIP_TRIES = 16
"""With ``skip_bad_samples``, a bad sample is replaced by the next good one within this many tries."""


@dataclass(frozen=True)
class TaskConfig:
    head: str
    """How the task uses the backbone: a name from the head registry (decoder_only, encoder_decoder)."""
    train: str
    """Training manifest: a JSONL path or ``builtin:<name>/<split>``."""
    val: str
    """Held-out manifest, same forms as ``train``."""
    source: str | None = None
    """Modality of the encoder input (encoder_decoder only): a name from the tokenizer registry."""
    batch_size: int = 8
    """Samples of this task in every micro-batch, per process."""
    weight: float = 1.0
    """Multiplier of this task's mean token loss in the total loss."""
    seq_len: int = 128
    """decoder_only: tokens per training window cut from the concatenated documents."""
    max_target_len: int = 16
    """encoder_decoder: target tokens kept (bos/eos excluded); also the most tokens generated at eval."""
    max_val_samples: int = 0
    """Evaluate on at most this many held-out samples (0: all)."""

    def check(self) -> None:
        if self.head not in HEADS:
            raise ConfigError("head", self.head, f"unknown head; known: {', '.join(HEADS.names())}")
        needs_source = HEADS.get(self.head).needs_encoder
        if needs_source and self.source not in TOKENIZERS:
            raise ConfigError("source", self.source, f"head {self.head} needs a source modality; known: "
                                                     f"{', '.join(TOKENIZERS.names())}")
        if not needs_source and self.source is not None:
            raise ConfigError("source", self.source, f"head {self.head} reads text only; leave source unset")
        for name in ("batch_size", "seq_len", "max_target_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, getattr(self, name), "must be > 0")
        if self.weight < 0:
            raise ConfigError("weight", self.weight, "must be >= 0")
        if self.max_val_samples < 0:
            raise ConfigError("max_val_samples", self.max_val_samples, "must be >= 0 (0 means all)")


@dataclass(frozen=True)
class DataConfig:
    tasks: dict[str, TaskConfig]
    """Tasks by name; each micro-batch mixes all of them."""
    mixing: Literal["fixed", "sampled"] = "fixed"
    """fixed: every micro-batch holds exactly ``batch_size`` samples of every task. sampled: each
    micro-batch draws sum(batch_size) samples, each from a task with probability batch_size / sum,
    so some micro-batches (and ranks) miss some tasks."""
    cache_dir: str = "build/data"
    """Where the built-in datasets are materialized (relative to the working directory)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process)."""
    skip_bad_samples: bool = False
    """Replace unreadable samples by the next readable one (counted and logged) instead of stopping."""

    def check(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks", self.tasks, "needs at least one task")
        if self.num_workers < 0:
            raise ConfigError("num_workers", self.num_workers, "must be >= 0")


@dataclass
class Record:
    """One manifest line, parsed."""

    fields: dict[str, Any]
    where: str
    """``<manifest>:<line>``, for messages."""
    base: Path
    """The manifest's folder, against which relative file paths resolve."""

    @property
    def sample_id(self) -> str:
        return str(self.fields.get("id", self.where))

    def path(self, key: str) -> Path:
        value = self.fields[key]
        if not isinstance(value, str) or not value:
            raise DataError(f"{self.where}: field {key!r} must be a file path, got {value!r}")
        path = Path(value)
        return path if path.is_absolute() else self.base / path


def read_manifest(path: Path, task: str, skip_bad: bool) -> list[Record]:
    """The lines of ``path`` meant for ``task``; bad lines raise, or are logged and counted when ``skip_bad``."""
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    records, bad = [], 0
    known = (*SAMPLE_FIELDS, *(m for m in TOKENIZERS.names() if m not in SAMPLE_FIELDS))  # plugin modalities too
    with path.open(encoding="utf-8", errors="strict") as lines:
        for number, line in enumerate(lines, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                fields = parse_line(line, where, known)
            except DataError as err:
                if not skip_bad:
                    raise
                bad += 1
                log.warning("skipping bad manifest line: %s", err)
                continue
            if fields.get("task", task) == task:
                records.append(Record(fields, where, path.parent))
    if bad:
        log.warning("%s: skipped %d bad line(s)", path, bad)
    if not records:
        raise DataError(f"{path}: no samples for task {task!r}")
    return records


def parse_line(line: str, where: str, known: tuple[str, ...]) -> dict[str, Any]:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(fields, dict):
        raise DataError(f"{where}: a manifest line must be a JSON object, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; known: {', '.join(known)}")
    for key, value in fields.items():  # JSON can spell lone surrogates ("\\ud800"); no tokenizer can take them
        if isinstance(value, str):
            check_unicode(value, f"{where}: field {key!r}")
    return fields


@dataclass
class Sample:
    """What a dataset returns for one index."""

    values: Any
    """LM: ``Tokens`` window of seq_len + 1 ids; seq2seq: (source ``Tokens``, target ids)."""
    sample_id: str
    target: str = ""
    skipped: list[str] = field(default_factory=list)
    """Messages of bad samples passed over to reach this one."""


class LMDataset(Dataset):
    """Documents concatenated (eos between them) and cut into windows of ``seq_len + 1`` tokens.

    The token stream is cached under ``cache_dir/tokens``, keyed by a hash of the
    tokenizer and the documents, so only the first run (or process) tokenizes.
    """

    def __init__(self, records: list[Record], text: TextTokenizer, seq_len: int, cache_dir: Path | None = None):
        texts = []
        for record in records:
            value = record.fields.get("text")
            if not isinstance(value, str):
                raise DataError(f"{record.where}: a decoder_only sample needs a 'text' string, got {value!r}")
            texts.append(value)
        self.tokens = token_stream(texts, text, cache_dir)
        self.seq_len = seq_len
        self.name = records[0].where.rsplit(":", 1)[0]
        if len(self) == 0:
            raise DataError(f"{self.name}: {len(self.tokens)} tokens, fewer than one window of seq_len+1={seq_len + 1}")

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> Sample:
        start = index * self.seq_len
        window = self.tokens[start: start + self.seq_len + 1].long()
        return Sample(text_tokens(window), f"{self.name}#window{index}")

    def collate(self, samples: list[Sample], pad_id: int) -> TaskBatch:
        ids = torch.stack([s.values.values for s in samples])
        inputs = Segment.collate([text_tokens(row[:-1]) for row in ids], pad_id)
        return TaskBatch(inputs, ids[:, 1:].clone(), sample_ids=[s.sample_id for s in samples])


def token_stream(texts: list[str], text: TextTokenizer, cache_dir: Path | None) -> torch.Tensor:
    """int32 ids of ``texts`` joined by eos (one after each), from the cache when present."""
    digest = hashlib.sha256(text.hf.to_str().encode())
    for value in texts:
        digest.update(value.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    path = None if cache_dir is None else Path(cache_dir) / "tokens" / f"{digest.hexdigest()[:32]}.safetensors"
    if path is not None and path.is_file():
        return load_file(str(path))["tokens"]
    stream = []
    for ids in text.encode_batch(texts):
        stream.extend(ids)
        stream.append(text.eos_id)
    tokens = torch.tensor(stream, dtype=torch.int32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"tokens": tokens}, tmp)
        os.replace(tmp, path)
    return tokens


class Seq2SeqDataset(Dataset):
    """(source in any modality, target text) pairs, decoded lazily from the manifest's files."""

    def __init__(self, records: list[Record], source: Any, text: TextTokenizer, max_target_len: int,
                 skip_bad: bool, augment: bool = False):
        self.source_key = source.modality
        for record in records:
            for key in (self.source_key, "target"):
                if key not in record.fields:
                    raise DataError(f"{record.where}: missing field {key!r}")
        self.records, self.source, self.text = records, source, text
        self.max_target_len, self.skip_bad = max_target_len, skip_bad
        self.target_overflow = Overflow(text.cfg.overflow, "max_target_len")
        """Targets longer than ``max_target_len`` tokens: cut (counted) or refused, per tokenizers.text.overflow."""
        self.augment = augment and getattr(source, "augments", False)
        """Ask the source tokenizer to augment (training data, and a tokenizer configured to), drawing from the
        loading process's torch RNG (seeded by the loader per worker)."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        skipped = []
        for attempt in range(MAX_SKIP_TRIES if self.skip_bad else 1):
            record = self.records[(index + attempt) % len(self.records)]
            try:
                return Sample(self.load(record), record.sample_id, str(record.fields["target"]), skipped)
            except DataError as err:
                if not self.skip_bad:
                    raise
                skipped.append(str(err))
        raise DataError(f"{MAX_SKIP_TRIES} bad samples in a row from {self.records[index].where}; last: {skipped[-1]}")

    def load(self, record: Record) -> tuple[Tokens, list[int]]:
        raw = record.fields[self.source_key]
        try:
            source = self.source(raw if self.source_key == "text" else record.path(self.source_key),
                                 **({"augment": True} if self.augment else {}))
        except DataError as err:
            raise DataError(f"{record.where}: {err}") from None
        if len(source) == 0:
            raise DataError(f"{record.where}: source {self.source_key} has no tokens")
        target = self.text.encode(str(record.fields["target"]))
        if len(target) > self.max_target_len:
            self.target_overflow(f"{record.where}: target", f"{len(target)} tokens", str(self.max_target_len))
        target = target[: self.max_target_len]
        return source, [self.text.bos_id, *target, self.text.eos_id]

    def collate(self, samples: list[Sample], pad_id: int) -> TaskBatch:
        source = Segment.collate([s.values[0] for s in samples], pad_id if self.source_key == "text" else 0)
        targets = [torch.tensor(s.values[1]) for s in samples]
        inputs = Segment.collate([text_tokens(t[:-1]) for t in targets], pad_id)
        labels = torch.full(inputs.mask.shape, IGNORE_INDEX, dtype=torch.long)
        for row, t in enumerate(targets):
            labels[row, : len(t) - 1] = t[1:]
        return TaskBatch(inputs, labels, source, [s.sample_id for s in samples], [s.target for s in samples])


def build_dataset(task: TaskConfig, manifest: Path, name: str, tokenizers: dict[str, Any], skip_bad: bool,
                  cache_dir: Path | None = None, augment: bool = False) -> LMDataset | Seq2SeqDataset:
    """``augment``: training data, which source tokenizers that augment (SpecAugment) may alter."""
    records = read_manifest(manifest, name, skip_bad)
    text = tokenizers["text"]
    if HEADS.get(task.head).needs_encoder:
        return Seq2SeqDataset(records, tokenizers[task.source], text, task.max_target_len, skip_bad, augment)
    return LMDataset(records, text, task.seq_len, cache_dir)


class Schedule:
    """Which samples fill each global micro-batch slot: a pure function of (seed, slot).

    Slot ``k`` is the ``k``-th micro-batch of the whole job; rank ``r`` of ``W``
    processes takes the slots with ``k % W == r``.  Each task reads its own endless
    stream: epoch ``e`` is a seeded permutation of the dataset, and the stream
    position only depends on how many samples earlier slots took.  So a run
    resumed at slot ``k`` (on any number of processes) continues exactly where the
    job stopped, and 2 processes with micro-batch b see the same samples per step
    as 1 process with micro-batch 2b.
    """

    def __init__(self, sizes: dict[str, int], batch_sizes: dict[str, int], mixing: str, seed: int):
        self.sizes, self.batch_sizes, self.mixing, self.seed = sizes, batch_sizes, mixing, seed
        self.tasks = list(sizes)
        self.shares = torch.tensor([batch_sizes[t] for t in self.tasks], dtype=torch.float64)
        self._orders: dict[str, tuple[int, torch.Tensor]] = {}

    def counts(self, slot: int) -> dict[str, int]:
        """Samples of each task in ``slot``: the batch sizes (fixed), or a draw in their proportions (sampled)."""
        if self.mixing == "fixed":
            return dict(self.batch_sizes)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + slot)
        picks = torch.multinomial(self.shares, int(self.shares.sum()), replacement=True, generator=generator)
        drawn = torch.bincount(picks, minlength=len(self.tasks)).tolist()
        return dict(zip(self.tasks, drawn))

    def index(self, task: str, position: int) -> int:
        """Dataset index at ``position`` of ``task``'s stream."""
        epoch, offset = divmod(position, self.sizes[task])
        cached = self._orders.get(task)
        if cached is None or cached[0] != epoch:
            seed = self.seed * 1_000_003 + self.tasks.index(task) * 7919 + epoch
            cached = self._orders[task] = (epoch, torch.randperm(self.sizes[task],
                                                                 generator=torch.Generator().manual_seed(seed)))
        return int(cached[1][offset])

    def slots(self, start: "StreamState", rank: int, world_size: int) -> Iterator["Slot"]:
        """This rank's slots from ``start`` on, with the dataset indices of their samples."""
        slot, positions = start.slot, dict(start.positions)
        while True:
            counts = self.counts(slot)
            if slot % world_size == rank:
                yield Slot(slot, {t: [self.index(t, p) for p in range(positions.get(t, 0), positions.get(t, 0) + c)]
                                  for t, c in counts.items() if c})
            for t, c in counts.items():
                positions[t] = positions.get(t, 0) + c
            slot += 1

    def advance(self, state: "StreamState", n_slots: int) -> "StreamState":
        """The stream state ``n_slots`` slots after ``state``."""
        positions = dict(state.positions)
        for slot in range(state.slot, state.slot + n_slots):
            for t, c in self.counts(slot).items():
                positions[t] = positions.get(t, 0) + c
        return StreamState(state.slot + n_slots, positions)


@dataclass(frozen=True)
class StreamState:
    """Where the job's data stream stands: the next global slot and each task's stream position."""

    slot: int = 0
    positions: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Slot:
    index: int
    samples: dict[str, list[int]]
    """Task -> dataset indices; tasks with no sample in this slot are absent."""


@dataclass
class MicroBatch:
    tasks: dict[str, TaskBatch]
    skipped: list[str]
    """Bad samples passed over while building this batch (empty unless ``skip_bad_samples``)."""
    slot: Slot

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch({name: part.to(device) for name, part in self.tasks.items()}, self.skipped, self.slot)


@dataclass
class LoadFailure:
    """A data error caught in a loader worker, re-raised cleanly by the training process."""

    message: str


class Mixture(Dataset):
    """A ``Slot`` -> its micro-batch, loaded and collated (runs in loader workers)."""

    def __init__(self, datasets: dict[str, Dataset], pad_id: int):
        self.datasets, self.pad_id = datasets, pad_id

    def __getitem__(self, slot: Slot) -> MicroBatch | LoadFailure:
        try:
            return self.build(slot)
        except PolytrainError as err:
            return LoadFailure(str(err))

    def build(self, slot: Slot) -> MicroBatch:
        parts, skipped = {}, []
        for name, indices in slot.samples.items():
            ds = self.datasets[name]
            samples = [ds[i] for i in indices]
            skipped += [msg for s in samples for msg in s.skipped]
            parts[name] = ds.collate(samples, self.pad_id)
        return MicroBatch(parts, skipped, slot)


def micro_batches(mixture: Mixture, slots: Iterator[Slot], num_workers: int) -> Iterator[MicroBatch]:
    """The micro-batches of ``slots``, loaded by ``num_workers`` processes; data errors raise here."""
    loader = DataLoader(mixture, batch_size=None, sampler=_Slots(slots), num_workers=num_workers,
                        persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers else None)
    seen_bad: set[str] = set()
    for batch in loader:
        if isinstance(batch, LoadFailure):
            raise DataError(batch.message)
        for message in batch.skipped:
            if message not in seen_bad:
                seen_bad.add(message)
                log.warning("skipped bad sample (%d so far): %s", len(seen_bad), message)
        yield batch


class _Slots:
    """A sampler over an endless slot iterator (DataLoader wants an iterable)."""

    def __init__(self, slots: Iterator[Slot]):
        self.slots = slots

    def __iter__(self) -> Iterator[Slot]:
        return self.slots


def eval_batches(dataset: Dataset, batch_size: int, limit: int, pad_id: int):
    """The held-out set in order, unsharded (every rank evaluates all of it), in batches."""
    count = len(dataset) if limit == 0 else min(limit, len(dataset))
    for start in range(0, count, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        yield dataset.collate(samples, pad_id)
