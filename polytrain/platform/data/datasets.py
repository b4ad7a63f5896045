"""Datasets: a manifest's records as samples for a task's head, tokenized (lazily or cached), and collated.

LM tasks read documents joined and cut into windows; sequence-to-sequence
tasks read (source in any modality, target text) pairs.
"""

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from polytrain import atomic
from polytrain.errors import DataError
from polytrain.models.config import head_kind
from polytrain.platform.data.config import TaskConfig
from polytrain.platform.data.manifest import Record, read_manifest
from polytrain.tokenizers.overflow import Overflow
from polytrain.tokenizers.text import TextTokenizer
from polytrain.tokens import IGNORE_INDEX, Segment, TaskBatch, Tokens, text_tokens

log = logging.getLogger(__name__)

MAX_SKIP_TRIES = 16
"""With ``skip_bad_samples``, a bad sample is replaced by the next good one within this many tries."""


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
        atomic.write(path, lambda tmp: save_file({"tokens": tokens}, tmp))
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
    if head_kind(task.head).encoder:
        return Seq2SeqDataset(records, tokenizers[task.source], text, task.max_target_len, skip_bad, augment)
    return LMDataset(records, text, task.seq_len, cache_dir)


