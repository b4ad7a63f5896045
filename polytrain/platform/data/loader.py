"""The loader: a slot's samples loaded and collated into a micro-batch, in worker processes or in this one."""

import logging
from dataclasses import dataclass
from typing import Iterator

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

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch({name: part.to(device) for name, part in self.tasks.items()}, self.skipped, self.slot)


@dataclass
class LoadFailure:
    """A data error caught in a loader worker, re-raised cleanly by the training process."""

    message: str


class Mixture(Dataset):
    """A ``Slot`` -> its micro-batch, loaded and collated (runs in loader workers).

    What collation draws at random (masked_lm's masks) comes from a generator seeded by ``seed`` and the
    slot, so it is a pure function of the data order, as the samples are.
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
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + slot.index)
        for name, indices in slot.samples.items():
            ds = self.datasets[name]
            samples = [ds[i] for i in indices]
            skipped += [msg for s in samples for msg in s.skipped]
            parts[name] = ds.collate(samples, generator)
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


EVAL_SEED = 0
"""Seeds what evaluation batches draw (masked_lm's masks): every evaluation of a run masks the same tokens."""


def eval_batches(dataset: Dataset, batch_size: int, limit: int):
    """The held-out set in order, unsharded (every rank evaluates all of it), in batches."""
    count = len(dataset) if limit == 0 else min(limit, len(dataset))
    generator = torch.Generator().manual_seed(EVAL_SEED)
    for start in range(0, count, batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, count))]
        yield dataset.collate(samples, generator)
