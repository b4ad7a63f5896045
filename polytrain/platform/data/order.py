"""The data order: which samples fill each global micro-batch slot, a pure function of (seed, slot).

So the order does not depend on how many processes read the data, and a run
resumed at any slot, on any number of processes, continues exactly where it
stopped (see ``DataOrder``).  Tasks with a cost budget fill whole steps
instead (``balance.py``): what a step holds is a pure function of (seed, step),
only its split over ranks depends on how many there are.
"""

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import count
from typing import Callable, Iterator

import numpy as np
import torch

from polytrain.platform.data.balance import CostModel, deal, pool_steps, rank_loads, take

POOLS_KEPT = 3
"""Pools of each budgeted task kept computed (the one being read, the one being advanced past, the next)."""


@dataclass(frozen=True)
class Budget:
    """A task whose steps are filled to a cost rather than a count of samples."""

    step_cost: float
    """What one step's samples may cost together, all ranks and micro-batches: the task's budget x
    train.grad_accum x processes."""
    bucket_steps: int
    """Steps whose samples are sorted by length together (``balance.pool_steps``)."""
    model: CostModel
    lengths: Callable[[int], tuple[int, ...]]
    """Dataset index -> tokens of each of the sample's sequences."""


@dataclass(frozen=True)
class Pool:
    """``size`` stream positions from ``start``, cut into steps: per step, its dataset indices and lengths."""

    start: int
    size: int
    steps: list[tuple[np.ndarray, np.ndarray]]


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

    def __init__(self, sizes: dict[str, int], batch_sizes: dict[str, int], mixing: str, seed: int,
                 budgets: dict[str, Budget] | None = None, slots_per_step: int = 1):
        """``batch_sizes``: of the tasks without a budget; ``budgets``: the others'; ``slots_per_step``:
        train.grad_accum x processes (the slots a budgeted step is dealt to)."""
        self.sizes, self.batch_sizes, self.mixing, self.seed = sizes, batch_sizes, mixing, seed
        self.budgets, self.slots_per_step = budgets or {}, slots_per_step
        self.tasks = list(sizes)
        self.shares = torch.tensor([batch_sizes[t] for t in batch_sizes], dtype=torch.float64)
        self._orders: dict[str, tuple[int, torch.Tensor]] = {}
        self._pools: OrderedDict[tuple[str, int], Pool] = OrderedDict()
        self._dealt: tuple[tuple[int, int, int], dict[str, list[list[np.ndarray]]]] | None = None
        assert not self.budgets or mixing == "fixed", "budgeted tasks fill steps; mixing must be fixed"

    def counts(self, slot: int) -> dict[str, int]:
        """Samples of each task in ``slot``: the batch sizes (fixed), or a draw in their proportions (sampled)."""
        if self.mixing == "fixed":
            return dict(self.batch_sizes)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + slot)
        picks = torch.multinomial(self.shares, int(self.shares.sum()), replacement=True, generator=generator)
        drawn = torch.bincount(picks, minlength=len(self.batch_sizes)).tolist()
        return dict(zip(self.batch_sizes, drawn))

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
        """This rank's slots from ``start`` (the beginning of a step) on, with the dataset indices of their
        samples."""
        slot, positions, step = start.slot, dict(start.positions), start.step
        accum = self.slots_per_step // world_size
        while True:
            counts = self.counts(slot)
            if slot % world_size == rank:
                samples = {t: [self.index(t, p) for p in range(positions.get(t, 0), positions.get(t, 0) + c)]
                           for t, c in counts.items() if c}
                micro = (slot - start.slot) % self.slots_per_step
                for t, dealt in self.dealt(step, positions, world_size, accum).items():
                    if len(dealt[rank][micro // world_size]):
                        samples[t] = dealt[rank][micro // world_size].tolist()
                yield Slot(slot, samples)
            for t, c in counts.items():
                positions[t] = positions.get(t, 0) + c
            slot += 1
            if (slot - start.slot) % self.slots_per_step == 0:
                positions = self.past_step(positions, step)
                step += 1

    def advance(self, state: "StreamState", n_slots: int) -> "StreamState":
        """The stream state ``n_slots`` slots (whole steps) after ``state``."""
        positions = dict(state.positions)
        for slot in range(state.slot, state.slot + n_slots):
            for t, c in self.counts(slot).items():
                positions[t] = positions.get(t, 0) + c
        steps = n_slots // self.slots_per_step
        for step in range(state.step, state.step + steps):
            positions = self.past_step(positions, step)
        return StreamState(state.slot + n_slots, positions, state.step + steps)

    def past_step(self, positions: dict[str, int], step: int) -> dict[str, int]:
        """``positions`` after ``step``: a budgeted task's moves past its pool once the pool's last step is done
        (until then it stays at the pool's start)."""
        moved = dict(positions)
        for t, budget in self.budgets.items():
            if (step + 1) % budget.bucket_steps == 0:
                moved[t] = positions.get(t, 0) + self.pool(t, step // budget.bucket_steps, positions.get(t, 0)).size
        return moved

    def pool(self, task: str, number: int, start: int) -> Pool:
        """Pool ``number`` of a budgeted task, beginning at stream position ``start``: the samples that fit
        ``bucket_steps`` steps' cost, cut into steps by length (``balance.pool_steps``)."""
        cached = self._pools.get((task, start))
        if cached is not None:
            return cached
        budget, lengths = self.budgets[task], []

        def costs() -> Iterator[float]:
            for position in count(start):
                lengths.append(budget.lengths(self.index(task, position)))
                yield float(budget.model.costs(np.array([lengths[-1]]))[0])

        size = take(costs(), budget.bucket_steps * budget.step_cost)
        indices = np.array([self.index(task, p) for p in range(start, start + size)])
        table = np.array(lengths[:size])
        seed = self.seed * 1_000_003 + self.tasks.index(task) * 7919 + number
        runs = pool_steps(table, budget.bucket_steps, budget.model, seed)
        self._pools[task, start] = pool = Pool(start, size, [(indices[r], table[r]) for r in runs])
        if len(self._pools) > POOLS_KEPT * len(self.budgets):  # the loader reads ahead while the trainer advances
            self._pools.popitem(last=False)
        return pool

    def dealt(self, step: int, positions: dict[str, int], ranks: int, accum: int) -> dict[str, list[list[np.ndarray]]]:
        """Each budgeted task's [rank][micro-batch] -> dataset indices in ``step`` (``positions``: where each
        task's pool starts).  The tasks are dealt one after another, each counting what the ones before it put
        on every rank, so that the step's whole load is even."""
        key = (step, ranks, accum)
        if self._dealt is not None and self._dealt[0] == key:  # every slot of this rank in the step asks for it
            return self._dealt[1]
        loads, dealt = np.zeros(ranks), {}
        for task, budget in self.budgets.items():
            pool = self.pool(task, step // budget.bucket_steps, positions.get(task, 0))
            indices, lengths = pool.steps[step % budget.bucket_steps]
            micro = deal(lengths, ranks, accum, budget.model, loads)
            loads = loads + rank_loads(lengths, micro, budget.model)
            dealt[task] = [[indices[b] for b in batch] for batch in micro]
        self._dealt = key, dealt
        return dealt


@dataclass(frozen=True)
class StreamState:
    """Where the job's data stream stands: the next global slot and each task's stream position."""

    slot: int = 0
    positions: dict[str, int] = field(default_factory=dict)
    """A budgeted task's: where its current pool begins."""
    step: int = 0
    """Steps done (budgeted tasks fill steps)."""


@dataclass(frozen=True)
class Slot:
    index: int
    samples: dict[str, list[int]]
    """Task -> dataset indices; tasks with no sample in this slot are absent."""
