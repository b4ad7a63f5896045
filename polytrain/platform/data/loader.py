"""The loader: a slot's samples loaded and collated into a micro-batch, in worker processes or in this one."""

import logging
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from polytrain.errors import DataError, PolytrainError
from polytrain.platform.data.order import Slot
from polytrain.tokens import TaskBatch

log = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    tasks: dict[str, TaskBatch]
    skipped: list[str]
    """Bad samples passed over while building this batch (empty unless ``skip_bad_samples``)."""
    slot: Slot

    def pin_memory(self) -> "MicroBatch":
        """Its tensors in page-locked memory (the loader pins batches bound for a GPU)."""
        return MicroBatch({name: part.pin_memory() for name, part in self.tasks.items()}, self.skipped, self.slot)


@dataclass
class LoadFailure:
    """A data error caught in a loader worker, re-raised cleanly by the training process."""

    message: str


class Mixture(Dataset):
    """A ``Slot`` -> its micro-batch, loaded and collated (runs in loader workers).

    What loading and collation draw at random (SpecAugment's masks from torch's generator, masked_lm's
    masks from their own) is seeded by ``seed`` and the slot, so it is a pure function of the data order, as
    the samples are, whichever process (or how many) loads it.
    """

    def __init__(self, datasets: dict[str, Dataset], seed: int):
        self.datasets, self.seed = datasets, seed

    def __getitem__(self, slot: Slot) -> MicroBatch | LoadFailure:
        try:
            return self.build(slot)
        except PolytrainError as err:
            return LoadFailure(str(err))

    def build(self, slot: Slot) -> MicroBatch:
        parts, skipped = {}, []
        seed = self.seed * 1_000_003 + slot.index
        generator = torch.Generator().manual_seed(seed)
        with seeded_cpu_generator(seed):
            for name, indices in slot.samples.items():
                ds = self.datasets[name]
                samples = [ds[i] for i in indices]
                skipped += [msg for s in samples for msg in s.skipped]
                parts[name] = ds.collate(samples, generator)
        return MicroBatch(parts, skipped, slot)


@contextmanager
def seeded_cpu_generator(seed: int) -> Iterator[None]:
    """torch's default CPU generator seeded with ``seed`` inside the block and as it was after it (the training
    process's own draws stay as they were); 30x cheaper than ``torch.random.fork_rng`` + ``torch.manual_seed``,
    which also visit every device's generator."""
    state = torch.default_generator.get_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(state)


def micro_batches(mixture: Mixture, slots: Iterator[Slot], num_workers: int, prefetch: int = 2,
                  pin_memory: bool = False) -> Iterator[MicroBatch]:
    """The micro-batches of ``slots``, loaded by ``num_workers`` processes that each keep ``prefetch`` ready
    (0 workers: loaded here, when asked for); ``pin_memory`` for a GPU. Data errors raise here."""
    loader = DataLoader(mixture, batch_size=None, sampler=_Slots(slots), num_workers=num_workers,
                        persistent_workers=num_workers > 0, prefetch_factor=prefetch if num_workers else None,
                        pin_memory=pin_memory, worker_init_fn=seed_worker)
    seen_bad: set[str] = set()
    for batch in loader:
        if isinstance(batch, LoadFailure):
            raise DataError(batch.message)
        for message in batch.skipped:
            if message not in seen_bad:
                seen_bad.add(message)
                log.warning("skipped bad sample (%d so far): %s", len(seen_bad), message)
        yield batch


def seed_worker(worker_id: int) -> None:
    """NumPy's and Python's generators from the worker's own torch seed (DataLoader seeds only torch's), so no
    two workers draw the same numbers; what a batch draws through torch is seeded per slot (``Mixture``)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class _Slots:
    """A sampler over an endless slot iterator (DataLoader wants an iterable)."""

    def __init__(self, slots: Iterator[Slot]):
        self.slots = slots

    def __iter__(self) -> Iterator[Slot]:
        return self.slots


EVAL_SEED = 0
"""Seeds what evaluation batches draw (masked_lm's masks): every evaluation of a run masks the same tokens."""


def eval_batches(dataset: Dataset, batch_size: int, limit: int):
    """The held-out set in order, unsharded (every rank evaluates all of it), in batches."""
    count = len(dataset) if limit == 0 else min(limit, len(dataset))
    generator = torch.Generator().manual_seed(EVAL_SEED)
    for start in range(0, count, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        yield dataset.collate(samples, generator)
