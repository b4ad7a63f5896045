"""The prepare step: records -> a prepared split (``shards.py``), tokenized once, in parallel, resumably.

Records are cut into shards of ``shard_records`` in input order; each shard is built by a worker process
(its text tokenized, its files read, decoded once to check them and to measure their sizes, then stored as
they were) and written whole under a temporary name.  The split's ``index.json`` is rewritten after every
shard, so an interrupted prepare continues where it stopped: shards already listed, whose files still match
their checksums, are not built again, and the result is the same files an uninterrupted prepare writes.
"""

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from polytrain import atomic
from polytrain.config import Config
from polytrain.config.model import head_kind
from polytrain.config.registries import LAYOUTS
from polytrain.config.tokenizers import TextTokenizerConfig
from polytrain.errors import DataError
from polytrain.platform.data.builtin import PREPARED_PREFIX, SPLITS, Manifests
from polytrain.platform.data.manifest import Part, Record, iter_manifest
from polytrain.platform.data.shards import (
    TOKENIZER_FILE,
    PreparedPart,
    ShardInfo,
    SplitIndex,
    file_sha256,
    is_prepared,
    write_shard,
)
from polytrain.platform.data.token_store import piece_sha256, tokenizer_sha256
from polytrain.tokenizers.audio_files import read_audio
from polytrain.tokenizers.image_files import read_image
from polytrain.tokenizers.text import TextTokenizer

log = logging.getLogger(__name__)

SHARD_RECORDS = 1000
"""Default input records per shard."""
IN_FLIGHT_PER_WORKER = 2
"""Shards handed to each worker ahead of its results: the reading of records keeps up, memory stays bounded."""


@dataclass(frozen=True)
class PrepareJob:
    """What one worker builds: shard ``number`` of ``records``."""

    folder: Path
    number: int
    records: list
    skip_bad: bool
    tokenizer: str
    """sha256 of the tokenizer's ``tokenizer.json``, recorded in the shard."""


@dataclass(frozen=True)
class JobResult:
    number: int
    shard: ShardInfo | None
    """None when a bad record stopped the shard (``error`` says which)."""
    skipped: list[str]
    error: str | None = None


Builder = Callable[[Iterator[PrepareJob]], Iterator[JobResult]]
"""Builds the shards of jobs, in worker processes or in this one (``shard_builder``)."""


def prepare_split(records: Iterable, out: Path, text: TextTokenizer, source: dict[str, Any], build: Builder,
                  shard_records: int = SHARD_RECORDS, skip_bad: bool = False) -> SplitIndex:
    """Prepare ``records`` (manifest ``Record`` objects, read lazily) into the split folder ``out``.

    ``source`` describes the input (so a continued prepare can tell it is the same); ``build`` (from
    ``shard_builder`` with the same ``text``) builds the shards.  A bad record raises ``DataError`` naming its
    manifest line, or with ``skip_bad`` is logged, counted in the index and left out.
    """
    out = Path(out)
    tokenizer_json = text.hf.to_str()
    index = open_index(out, tokenizer_sha256(tokenizer_json), text.vocab_size, shard_records, source)
    if index.complete:
        log.info("%s: already prepared (%d records in %d shards)", out, index.rows, len(index.shards))
        return index
    atomic.write_text(out / TOKENIZER_FILE, tokenizer_json)
    done = intact_shards(out, index)
    began, records = time.perf_counter(), iter(records)

    def jobs() -> Iterator[PrepareJob]:
        number = 0
        while chunk := list(islice(records, shard_records)):
            if number not in done:
                yield PrepareJob(out, number, chunk, skip_bad, index.tokenizer_sha256)
            number += 1

    for result in build(jobs()):
        if result.error is not None:
            raise DataError(result.error)
        for message in result.skipped:
            log.warning("skipping bad record: %s", message)
        index.shards[result.number] = result.shard
        index.write(out)
        log.info("%s: shard %d done (%d records)", out, result.number, result.shard.rows)
    index.complete = True
    index.write(out)
    log.info("%s: prepared %d records in %d shards (%d bad skipped) in %.1f s", out, index.rows, len(index.shards),
             index.skipped, time.perf_counter() - began)
    return index


def open_index(out: Path, tokenizer_hash: str, vocab_size: int, shard_records: int,
               source: dict[str, Any]) -> SplitIndex:
    """The split's index: new, or the one of an earlier prepare of the same input with the same settings."""
    fresh = SplitIndex(tokenizer_hash, vocab_size, shard_records, source)
    if not (out / "index.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        fresh.write(out)
        return fresh
    index = SplitIndex.read(out)
    for name, now in (("tokenizer_sha256", tokenizer_hash), ("shard_records", shard_records), ("source", source)):
        before = getattr(index, name)
        if before != now:
            raise DataError(f"{out}: an earlier prepare there had {name} {before}, this one has {now}; continue it "
                            f"with the same input and settings, or prepare into another folder")
    return index


def intact_shards(out: Path, index: SplitIndex) -> set[int]:
    """The shards of ``index`` whose files are there and match their checksums; the others are built again."""
    intact = set()
    for number, shard in list(index.shards.items()):
        try:
            ok = file_sha256(out / shard.name) == shard.sha256 and \
                piece_sha256(out, shard.tokens.stem) == shard.tokens.sha256
        except OSError:
            ok = False
        if ok:
            intact.add(number)
        else:
            log.warning("%s: shard %d does not match its checksum; building it again", out, number)
            del index.shards[number]
    return intact


def is_document(record: Record) -> bool:
    """One text part: a language-modeling document."""
    return len(record.parts) == 1 and record.parts[0].modality == "text"


@contextmanager
def shard_builder(text: TextTokenizer, workers: int) -> Iterator[Builder]:
    """A ``Builder`` whose ``workers`` processes (0: one per CPU; 1: this process) encode with ``text``."""
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        init_worker(text.hf.to_str(), text.cfg, threads=None, tokenizer=text)
        yield lambda jobs: map(build_shard, jobs)
        return
    context = get_context("spawn")  # a fresh interpreter: no tokenizer thread pool inherited through fork
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker,
                             initargs=(text.hf.to_str(), text.cfg, 1)) as pool:
        yield lambda jobs: pooled(pool, workers, jobs)


def pooled(pool: ProcessPoolExecutor, workers: int, jobs: Iterator[PrepareJob]) -> Iterator[JobResult]:
    """Results of ``jobs`` as the pool's processes finish them, at most ``IN_FLIGHT_PER_WORKER`` each ahead."""
    pending: set[Future] = set()
    try:
        for job in jobs:
            pending.add(pool.submit(build_shard, job))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in finished)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (f.result() for f in finished)
    finally:
        for future in pending:
            future.cancel()


_TEXT: TextTokenizer | None = None
"""The worker's text tokenizer."""


def init_worker(tokenizer_json: str, cfg: TextTokenizerConfig, threads: int | None,
                tokenizer: TextTokenizer | None = None) -> None:
    """Build this process's tokenizer; ``threads`` caps the tokenizer's own thread pool (one per worker)."""
    global _TEXT
    if threads is not None:
        os.environ["RAYON_NUM_THREADS"] = str(threads)
    _TEXT = tokenizer or TextTokenizer.from_json(tokenizer_json, cfg, TOKENIZER_FILE)


def build_shard(job: PrepareJob) -> JobResult:
    """Tokenize, read and check ``job``'s records, then write its shard (runs in a worker)."""
    loaded, skipped = [], []
    for record in job.records:
        try:
            loaded.append(load_record(record))
        except DataError as err:
            if not job.skip_bad:
                return JobResult(job.number, None, [], str(err))
            skipped.append(str(err))
    texts = [p.value for r in loaded for p in r.parts if p.modality == "text" and isinstance(p.value, str)]
    encoded = iter(_TEXT.encode_batch(texts))
    prepared = [replace(r, parts=tuple(with_ids(p, encoded) if p.modality == "text" else p for p in r.parts))
                for r in loaded]
    shard = write_shard(job.folder, job.number, prepared, _TEXT.vocab_size, job.tokenizer, len(skipped),
                        documents=all(is_document(r) for r in job.records))
    return JobResult(job.number, shard, skipped)


def with_ids(part: PreparedPart, encoded: Iterator[list[int]]) -> PreparedPart:
    """A text part as its ids: the next of ``encoded`` for a string, the ids it already holds otherwise."""
    ids = tuple(next(encoded) if isinstance(part.value, str) else part.value)
    return replace(part, value=ids, dims=(len(ids), 0))


def load_record(record: Record) -> Record:
    """``record``'s parts with each file read, decoded once to check it, and measured; text as it is."""
    return replace(record, parts=tuple(load_part(part, record.where) for part in record.parts))


def load_part(part: Part, where: str) -> PreparedPart:
    if part.modality == "text":
        return PreparedPart("text", part.value, part.scored)
    if isinstance(part.value, bytes):
        raise DataError(f"{where}: a {part.modality} part holds bytes; prepare reads files by path")
    path = Path(part.value)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{where}: {path}: cannot read the {part.modality} file ({err.strerror})") from None
    try:
        return PreparedPart(part.modality, data, part.scored, measure(part.modality, path, data))
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def measure(modality: str, path: Path, data: bytes) -> tuple[int, int]:
    """``PreparedPart.dims`` of a file, decoding it (images, audio) so that a bad one is found now."""
    if modality == "image":
        width, height = read_image(path).size
        return height, width
    if modality == "audio":
        samples, rate = read_audio(path)
        return samples.shape[1], rate
    return len(data), 0  # a plugin modality's file: its tokenizer decodes it when training


def prepare_tasks(cfg: Config, manifests: Manifests, text: TextTokenizer, out: Path, workers: int,
                  shard_records: int) -> list[str]:
    """Prepare every task's train and val data (``manifests``) into ``out/<task>/<split>``, text encoded with
    ``text`` (the job's tokenizer); splits the recipe already reads prepared are left as they are. Returns the
    overrides that point the recipe at the result."""
    with shard_builder(text, workers) as build:
        return [prepare_task_split(cfg, name, split, manifests[name][split], text, out, build, shard_records)
                for name in cfg.data.tasks for split in SPLITS if not is_prepared(manifests[name][split])]


def prepare_task_split(cfg: Config, name: str, split: str, source: Path, text: TextTokenizer, out: Path,
                       build: Builder, shard_records: int) -> str:
    """Prepare one manifest of the recipe (``source``); returns the override that names the result."""
    if not source.is_file():
        raise DataError(f"{source}: manifest not found (data.tasks.{name}.{split})")
    stat = source.stat()
    records = iter_manifest(source, name, cfg.data.skip_bad_samples,
                            plain_text_scored=LAYOUTS.get(head_kind(cfg.data.tasks[name].head).layout).plain_text_scored)
    described = {"manifest": str(source.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "task": name}
    prepare_split(records, out / name / split, text, described, build, shard_records, cfg.data.skip_bad_samples)
    return f"data.tasks.{name}.{split}={PREPARED_PREFIX}{out / name / split}"
