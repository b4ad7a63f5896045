"""Datasets: a task's manifest records as examples for its head, and the collation of examples into batches.

Two kinds:

- ``LMStream``: modeling documents (every record one plain text): the
  documents joined by eos and cut into windows, of ``seq_len + 1`` tokens
  shifted by one for next-token prediction, of ``seq_len`` tokens for masked
  LM; with ``packing`` each window keeps its document boundaries (attention
  and positions restart at each document).  From a manifest, the stream is
  cached under ``cache_dir/tokens``, so only the first run (or process)
  tokenizes; from a prepared split, windows are read from its memory-mapped
  token store, and the corpus is never joined in memory.
- ``SequenceDataset``: one sample per record, its segments laid out for the
  head (``sequences.py``): decoder_only reads one causal sequence whose scored
  text carries the loss; encoder_decoder reads the inputs with the encoder and
  the scored text with the decoder; encoder_classifier reads every segment and
  predicts the sample's class; masked_lm reconstructs masked text tokens.
  Files are decoded lazily, in the loading process; a prepared split's records
  come from its shards (text already ids, files as their bytes).
"""

import hashlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from polytrain import atomic
from polytrain.config import Config
from polytrain.config.data import TaskConfig
from polytrain.config.model import head_kind
from polytrain.config.registries import LAYOUTS
from polytrain.errors import DataError
from polytrain.models.mlm_corruption import mask_tokens
from polytrain.platform.data.builtin import Manifests
from polytrain.platform.data.manifest import Part, Record, read_manifest
from polytrain.platform.data.packing import PackedDocuments, StoreWindows
from polytrain.platform.data.sequences import Laid, Plain, collate_labels, collate_rows, first_fit
from polytrain.platform.data.shards import PreparedSplit, is_prepared
from polytrain.platform.data.token_store import tokenizer_sha256
from polytrain.tokenizers.overflow import Overflow
from polytrain.tokenizers.text import TextTokenizer
from polytrain.tokens import TaskBatch

log = logging.getLogger(__name__)

MAX_SKIP_TRIES = 16
"""With ``skip_bad_samples``, a bad sample is replaced by the next good one within this many tries."""


@dataclass
class Example:
    """One sample, laid out for its task's head."""

    inputs: Laid | Plain | list[Laid]
    """causal: the sequence (all but its last slot); the others: the encoder's input; a packed LM window:
    the pieces of its documents."""
    labels: list[int] | int | None
    """causal: one per input slot; seq2seq: one per decoder slot; classify: the class id; masked: None."""
    sample_id: str
    target: str = ""
    """The scored text, or the class name: what evaluation compares with."""
    decoder: Laid | None = None
    """seq2seq: the decoder's input, bos and the target."""
    prompt: Laid | None = None
    """causal: the sequence before its first scored part, for generation."""
    skipped: list[str] = field(default_factory=list)
    """Messages of bad samples passed over to reach this one."""


class LMStream(Dataset):
    """Documents joined by eos, cut into windows: ``seq_len + 1`` tokens sharing one with the next (causal),
    or ``seq_len`` tokens each (masked).

    ``windows`` cuts them: ``PackedDocuments`` from a stream in memory (a manifest's documents, tokenized),
    ``StoreWindows`` from a prepared split's token store (mapped, never joined in memory).
    """

    def __init__(self, windows: PackedDocuments | StoreWindows, name: str, text: TextTokenizer, task: TaskConfig,
                 multiple: int = 1, masked: bool = False):
        self.windows, self.name = windows, name
        self.text, self.task, self.multiple, self.masked = text, task, multiple, masked
        if len(self) == 0:
            raise DataError(f"{name}: its documents hold fewer tokens than one window of {window_length(task, masked)}")

    @classmethod
    def of_records(cls, records: list[Record], text: TextTokenizer, task: TaskConfig, cache_dir: Path | None,
                   multiple: int = 1, masked: bool = False) -> "LMStream":
        tokens = token_stream([str(r.parts[0].value) for r in records], text, cache_dir)
        windows = PackedDocuments.from_stream(tokens, text.eos_id, window_length(task, masked), task.seq_len)
        return cls(windows, records[0].where.rsplit(":", 1)[0], text, task, multiple, masked)

    @classmethod
    def of_split(cls, split: PreparedSplit, text: TextTokenizer, task: TaskConfig, multiple: int = 1,
                 masked: bool = False) -> "LMStream":
        windows = StoreWindows(split.tokens, text.eos_id, window_length(task, masked), task.seq_len)
        return cls(windows, str(split.folder), text, task, multiple, masked)

    def __len__(self) -> int:
        return len(self.windows)

    def lengths(self, index: int) -> tuple[int, ...]:
        """Every window is ``seq_len`` tokens (see ``SequenceDataset.lengths``)."""
        return (self.task.seq_len,)

    def __getitem__(self, index: int) -> Example:
        window = self.windows[index]
        ids = window.values.tolist()
        inputs, labels, docs = (ids, None, window.documents) if self.masked else \
            (ids[:-1], ids[1:], window.documents[:-1])
        if not self.task.packing:
            return Example(Laid(inputs, [True] * len(inputs)), labels, f"{self.name}#window{index}")
        pieces = [Laid(inputs[start:end], [True] * (end - start)) for start, end in runs(docs.tolist())]
        return Example(pieces, labels, f"{self.name}#window{index}")

    def collate(self, examples: list[Example], generator: torch.Generator | None = None) -> TaskBatch:
        rows = [e.inputs if isinstance(e.inputs, list) else [e.inputs] for e in examples]
        inputs = collate_rows(rows, self.text.pad_id, self.multiple)
        ids = [e.sample_id for e in examples]
        if self.masked:
            return masked_batch(inputs, self.text, self.task.mask_probability, generator, sample_ids=ids)
        return TaskBatch(inputs, collate_labels([[e.labels] for e in examples], inputs.values.shape[1]),
                         sample_ids=ids)


def masked_batch(inputs, text: TextTokenizer, probability: float, generator: torch.Generator | None,
                 **fields) -> TaskBatch:
    """A masked_lm batch: ``inputs`` with tokens masked, the originals as labels there."""
    corrupted, labels = mask_tokens(inputs.values, inputs.mask, probability, text.mask_id, text.special_ids,
                                    text.vocab_size, generator)
    return TaskBatch(replace(inputs, values=corrupted), labels, **fields)


def window_length(task: TaskConfig, masked: bool) -> int:
    """Tokens of an LM window: ``seq_len`` (masked), or one more, the last input's label (causal)."""
    return task.seq_len if masked else task.seq_len + 1


def runs(values: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of equal values."""
    bounds = [0, *(i for i in range(1, len(values)) if values[i] != values[i - 1]), len(values)]
    return list(zip(bounds[:-1], bounds[1:]))


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


class SequenceDataset(Dataset):
    """One example per record, laid out for the task's head; files decoded when the example is loaded."""

    def __init__(self, records: list[Record] | PreparedSplit, name: str, task: TaskConfig, tokenizers: dict[str, Any],
                 skip_bad: bool, augment: bool = False, multiple: int = 1):
        self.records, self.name, self.task, self.skip_bad = records, name, task, skip_bad
        self.text: TextTokenizer = tokenizers["text"]
        self.tokenizers, self.multiple = tokenizers, multiple
        self.layout = LAYOUTS.get(head_kind(task.head).layout)()
        """How the head's samples are laid out (``layouts.Layout``)."""
        self.augment = {m: augment and getattr(tokenizers[m], "augments", False) for m in task.modalities}
        """Modalities whose tokenizer augments training samples (SpecAugment), drawing from the loading
        process's torch RNG (seeded by the loader per worker)."""
        self.budget = min(task.seq_len, self.text.max_len)
        self.overflow = Overflow(self.text.cfg.overflow, f"data.tasks.{name}.seq_len")
        self.target_overflow = Overflow(self.text.cfg.overflow, "max_target_len")
        """Targets longer than ``max_target_len`` tokens: cut (counted) or refused, per tokenizers.text.overflow."""
        kinds = records.index.inputs if isinstance(records, PreparedSplit) else \
            {tuple(p.modality for p in r.parts if not p.scored) for r in records}
        self.plain = self.layout.encoder_input and len(task.modalities) == 1 and kinds == {task.modalities}
        """Every sample is one file of the task's one modality, read by the encoder: its tokens alone, without
        markers (as a ViT or Whisper reads its input)."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        skipped = []
        for attempt in range(MAX_SKIP_TRIES if self.skip_bad else 1):
            try:  # a prepared split's member can be bad too
                example = self.example(self.records[(index + attempt) % len(self.records)])
                example.skipped = skipped
                return example
            except DataError as err:
                if not self.skip_bad:
                    raise
                skipped.append(str(err))
        raise DataError(f"{MAX_SKIP_TRIES} bad samples in a row from {self.name}'s sample {index}; last: {skipped[-1]}")

    def example(self, record: Record) -> Example:
        return self.layout.example(self, record)

    def target_text(self, record: Record) -> str:
        """The scored parts' text, joined by spaces (a prepared split's are ids, decoded): what evaluation
        compares the model's output with."""
        return " ".join(self.text.decode(p.value) if isinstance(p.value, tuple) else str(p.value)
                        for p in record.parts if p.scored)

    def prompts(self, records: list[Record]) -> TaskBatch:
        """What generation starts from, for samples that may have no answer yet (``polytrain generate``): the
        encoder's input (encoder_decoder), or bos and every input segment (decoder_only); scored segments are
        references only (``targets``)."""
        fields = dict(sample_ids=[r.sample_id for r in records], targets=[self.target_text(r) for r in records],
                      labels=torch.zeros(len(records), 0, dtype=torch.long))
        return self.layout.prompts(self, records, fields)

    def sequence(self, record: Record, parts: list[Part], budget: int) -> Laid | Plain:
        """The encoder's input: one file alone (plain), or the segments laid out with markers."""
        if self.plain:
            return Plain(parts[0].modality, self.file_tokens(record, parts[0]))
        laid = Laid()
        for part in parts:
            self.add(laid, record, part)
        if len(laid) > budget:
            self.overflow(record.where, f"{len(laid)} tokens", str(budget))
            laid = laid.cut(budget)
        if not len(laid):
            raise DataError(f"{record.where}: nothing of the sample fits in {budget} tokens")
        return laid

    def add(self, laid: Laid, record: Record, part: Part) -> None:
        if part.modality == "text":
            ids = self.text_ids(record, [part], None, None)
            laid.add_text(ids + ([self.text.eos_id] if part.scored else []), part.scored)
        else:
            laid.add_span(part.modality, self.file_tokens(record, part), *self.text.span_layout(part.modality))

    def text_ids(self, record: Record, parts: list[Part], limit: int | None, overflow: Overflow | None) -> list[int]:
        ids = [i for part in parts for i in (list(part.value) if isinstance(part.value, tuple)
                                              else self.text.encode(part.value))]
        if not ids:
            raise DataError(f"{record.where}: text has no tokens")
        if limit is not None and len(ids) > limit:
            overflow(f"{record.where}: target", f"{len(ids)} tokens", str(limit))
            ids = ids[:limit]
        return ids

    def file_tokens(self, record: Record, part: Part):
        if part.modality not in self.task.modalities:
            raise DataError(f"{record.where}: a {part.modality} segment, but data.tasks.{self.name}.source does not "
                            f"name {part.modality} (it names {', '.join(self.task.modalities) or 'text only'})")
        try:
            tokens = self.tokenizers[part.modality](part.value, **({"augment": True} if self.augment[part.modality]
                                                                   else {}))
        except DataError as err:
            raise DataError(f"{record.where}: {err}") from None
        if len(tokens) == 0:
            raise DataError(f"{record.where}: {part.modality} segment has no tokens")
        return tokens

    def lengths(self, index: int) -> tuple[int, ...]:
        """Tokens of each sequence sample ``index`` becomes (the encoder's and the decoder's, or the one), counted
        from a prepared split's sizes without decoding a file: what cost budgets (``balance.py``) count."""
        if not isinstance(self.records, PreparedSplit):
            raise DataError(f"data.tasks.{self.name}: cost budgets read sample sizes from a prepared split; prepare "
                            f"the data (polytrain data prepare) and name it as prepared:DIR")
        parts = self.records.sizes(index)

        def count(modality: str, d0: int, d1: int) -> int:
            if modality == "text":
                return d0
            if not hasattr(self.tokenizers[modality], "count"):
                raise DataError(f"data.tasks.{self.name}: the {modality} tokenizer cannot count its tokens without "
                                f"decoding (it has no count method), so the task cannot have a budget")
            return self.tokenizers[modality].count(d0, d1)

        markers = 2 if self.text.cfg.span_markers else 0

        def laid(selected) -> int:  # text, with eos after scored text; spans between their markers
            return sum(count(m, d0, d1) + (int(scored) if m == "text" else markers) for m, scored, d0, d1 in selected)

        return self.layout.lengths(self, parts, count, laid)

    def collate(self, examples: list[Example], generator: torch.Generator | None = None) -> TaskBatch:
        """A batch of ``examples``; packed into as few rows as fit with ``packing``; ``generator`` draws the
        masked_lm masks (a pure function of the data order, so a resumed run masks the same way)."""
        sizes, budgets = self.layout.row_sizes(self, examples)
        groups = self.rows(sizes, budgets)
        ordered = [examples[i] for group in groups for i in group]
        inputs = collate_rows([[examples[i].inputs for i in group] for group in groups], self.text.pad_id,
                              self.multiple)
        fields = dict(sample_ids=[e.sample_id for e in ordered], targets=[e.target for e in ordered])
        return self.layout.batch(self, examples, groups, inputs, fields, generator)

    def rows(self, sizes: list[tuple[int, ...]], budgets: tuple[int, ...]) -> list[list[int]]:
        """Which examples share a row: one each, or packed."""
        return first_fit(sizes, budgets) if self.task.packing else [[i] for i in range(len(sizes))]


def build_datasets(cfg: Config, split: str, tokenizers: dict[str, Any], manifests: Manifests
                   ) -> dict[str, LMStream | SequenceDataset]:
    """Every task's dataset of ``split`` (train or val) from its manifest; training data may be augmented."""
    return {name: build_dataset(task, manifests[name][split], name, tokenizers, cfg.data.skip_bad_samples,
                                Path(cfg.data.cache_dir), augment=split == "train")
            for name, task in cfg.data.tasks.items()}


def build_dataset(task: TaskConfig, manifest: Path, name: str, tokenizers: dict[str, Any], skip_bad: bool,
                  cache_dir: Path | None = None, augment: bool = False) -> LMStream | SequenceDataset:
    """The dataset of a manifest, or of a prepared split (a folder ``polytrain data prepare`` wrote, whose text
    tokenizer must be this run's); ``augment``: training data, which tokenizers that augment (SpecAugment) may
    alter."""
    layout = LAYOUTS.get(head_kind(task.head).layout)
    text, multiple = tokenizers["text"], tokenizers["text"].cfg.pad_to_multiple
    if is_prepared(manifest):
        split = PreparedSplit(manifest, tokenizer_sha256(text.hf.to_str()))
        if layout.documents and split.index.documents:
            return LMStream.of_split(split, text, task, multiple, masked=layout.masks)
        return SequenceDataset(split, name, task, tokenizers, skip_bad, augment, multiple)
    records = read_manifest(manifest, name, skip_bad, plain_text_scored=layout.plain_text_scored)
    if layout.documents and all(len(r.parts) == 1 and r.parts[0].modality == "text" for r in records):
        return LMStream.of_records(records, text, task, cache_dir, multiple, masked=layout.masks)
    return SequenceDataset(records, name, task, tokenizers, skip_bad, augment, multiple)
