"""The data order: which samples fill each global micro-batch slot, a pure function of (seed, slot).

So the order does not depend on how many processes read the data, and a run
resumed at any slot, on any number of processes, continues exactly where it
stopped (see ``DataOrder``).
"""

from dataclasses import dataclass, field
from typing import Iterator

import torch


class DataOrder:
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
