"""Cost-budgeted, balanced micro-batches: which samples a step holds, and how they are dealt to ranks.

A task with a budget does not take a fixed count of samples per micro-batch.  Its stream is read in pools of
``bucket_steps`` steps: a pool takes samples in stream order while their summed cost fits ``bucket_steps x
the step's budget``, sorts them by cost and cuts them into that many runs of about equal cost, one per step
(in an order shuffled by the seed).  So each step holds samples of similar length, and what it holds depends
on the seed, the stream and the global budget only, never on the number of processes.  The step's samples are
then cut into its micro-batches (``ranks x grad_accum``), contiguous in length, so that the largest padded
cost is as small as it can be or evened out within that bound, and the micro-batches are dealt to ranks so that
their totals -- with what the step's other budgeted tasks put there -- are even.

Costs: a sample is a few sequences (an encoder's source, a decoder's text); a sequence of ``L`` tokens costs
``L + quadratic x L^2``.  A padded micro-batch of ``n`` rows costs ``n x sum(cost(longest of each sequence))``.
"""

from dataclasses import dataclass
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class CostModel:
    quadratic: float = 0.0
    """Weight of a sequence's squared length: 0 counts tokens; ``1 / (6 x dim)`` weighs attention's
    ``L^2 x d`` score FLOPs against the ``6 x L x d^2`` of the block's linear layers per token."""

    def costs(self, lengths: np.ndarray) -> np.ndarray:
        """(n,) cost of each sample of ``lengths`` (n, sequences)."""
        lengths = np.asarray(lengths, dtype=np.float64)
        return (lengths + self.quadratic * lengths**2).sum(axis=1)

    def padded(self, lengths: np.ndarray) -> float:
        """Cost of ``lengths`` (n, sequences) as one micro-batch: every row padded to the longest of each sequence."""
        if len(lengths) == 0:
            return 0.0
        return float(len(lengths) * self.costs(np.asarray(lengths).max(axis=0, keepdims=True))[0])


def cost_model(kind: str, dim: int) -> CostModel:
    """The cost a task's ``budget_cost`` names, for a backbone of width ``dim``."""
    if kind == "tokens":
        return CostModel()
    if kind == "attention":
        return CostModel(quadratic=1 / (6 * dim))
    raise ValueError(f"unknown budget cost {kind!r}; known: tokens, attention")


def take(costs: Iterable[float], budget: float) -> int:
    """How many of ``costs`` (in order) fit ``budget`` together; at least one."""
    total, count = 0.0, 0
    for cost in costs:
        if count and total + cost > budget:
            break
        total, count = total + cost, count + 1
    return count


def pool_steps(lengths: np.ndarray, n_steps: int, model: CostModel, seed: int) -> list[np.ndarray]:
    """A pool's samples (rows of ``lengths``) cut into ``n_steps`` steps of similar lengths and equal cost.

    Samples are sorted by cost (ties keep the pool's order) and cut where the running cost crosses each
    ``k / n_steps`` of the total; ``seed`` (drawn from the run's seed and the pool's number) orders the steps.
    Returns, for each step, the indices of its samples in the pool.
    """
    costs = model.costs(lengths)
    order = np.argsort(costs, kind="stable")
    running = np.cumsum(costs[order])
    cuts = np.searchsorted(running, running[-1] * np.arange(1, n_steps) / n_steps, side="right")
    runs = np.split(order, cuts)
    shuffle = np.random.default_rng(seed).permutation(n_steps)
    return [np.sort(runs[k]) for k in shuffle]


def deal(lengths: np.ndarray, ranks: int, accum: int, model: CostModel,
         loads: np.ndarray | None = None) -> list[list[np.ndarray]]:
    """One step's samples (rows of ``lengths``) as ``accum`` micro-batches for each of ``ranks`` ranks.

    The samples, sorted by cost, are cut into ``ranks x accum`` contiguous groups, two ways: the cut whose
    largest padded cost is the smallest possible (``min_max_split``), and one that evens the groups out within
    that bound (``even_split``).  Either's groups go to ranks largest first, each to the rank with the least so
    far that has room -- counting ``loads``, what each rank already holds of the step (other tasks'
    micro-batches, in their own cost), so that the tasks' heavy groups do not pile up on the same ranks -- and
    the way whose busiest rank holds less is kept.  Returns ``[rank][micro-batch]`` -> indices of the step's
    samples.
    """
    lengths = np.asarray(lengths)
    order = np.argsort(model.costs(lengths), kind="stable")
    ordered = lengths[order]
    tightest = min_max_split(ordered, ranks * accum, model)
    bound = max(model.padded(ordered[g]) for g in tightest)
    start = np.zeros(ranks) if loads is None else np.asarray(loads, dtype=np.float64)
    ways = [lpt(lengths, [order[g] for g in cut], ranks, accum, model, start)
            for cut in (tightest, even_split(ordered, ranks * accum, model, bound))]
    return min(ways, key=lambda way: way[1])[0]  # ties: the tightest cut


def lpt(lengths: np.ndarray, groups: list[np.ndarray], ranks: int, accum: int, model: CostModel,
        start: np.ndarray) -> tuple[list[list[np.ndarray]], float]:
    """``groups`` (indices into ``lengths``) dealt largest first, each to the least loaded rank (from ``start``)
    with fewer than ``accum``; returns the deal and its busiest rank's load."""
    totals, dealt = start.copy(), [[] for _ in range(ranks)]
    for cost, group in sorted(((model.padded(lengths[g]), g) for g in groups), key=lambda cg: -cg[0]):
        rank = min((r for r in range(ranks) if len(dealt[r]) < accum), key=lambda r: (totals[r], r))
        dealt[rank].append(group)
        totals[rank] += cost
    return dealt, float(totals.max())


def even_split(lengths: np.ndarray, n_groups: int, model: CostModel, bound: float) -> list[slice]:
    """``n_groups`` contiguous groups of the rows of ``lengths`` (sorted by cost), each in turn as near as it
    can be to an equal share of what remains (padded cost against the remaining rows' own cost over the groups
    left) without passing ``bound``; the last takes the rest, and groups past the last row are empty."""
    costs, n = model.costs(lengths), len(lengths)
    groups, start = [], 0
    for left in range(n_groups, 0, -1):
        if left == 1 or start >= n:
            groups.append(slice(start, n))
            start = n
            continue
        longest = np.maximum.accumulate(lengths[start:], axis=0)
        padded = np.arange(1, n - start + 1) * model.costs(longest)  # nondecreasing in the rows taken
        room = max(1, int(np.searchsorted(padded, bound, side="right")))
        stop = start + 1 + int(np.argmin(np.abs(padded[:room] - costs[start:].sum() / left)))
        groups.append(slice(start, stop))
        start = stop
    return groups


def min_max_split(lengths: np.ndarray, n_groups: int, model: CostModel) -> list[slice]:
    """``n_groups`` contiguous groups of the rows of ``lengths`` (sorted by cost) minimizing the largest padded
    cost (to ``TOLERANCE``); with fewer rows than groups, the last groups are empty.

    A group's padded cost only grows as it takes more rows, so for a bound ``T`` filling each group greedily up
    to ``T`` uses the fewest groups; the smallest ``T`` that needs at most ``n_groups`` is found by bisection.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    n = len(lengths)
    low = max(float(model.costs(lengths).max(initial=0.0)), float(model.costs(lengths).sum()) / n_groups)
    high = model.padded(lengths)
    while high - low > TOLERANCE * high:
        middle = (low + high) / 2
        if len(greedy_split(lengths, middle, model, n_groups + 1)) <= n_groups:
            high = middle
        else:
            low = middle
    groups = greedy_split(lengths, high, model, n_groups)
    while len(groups) < min(n_groups, n):  # room to spare: halve the costliest group of several rows
        k = max((k for k, g in enumerate(groups) if g.stop - g.start > 1),
                key=lambda k: model.padded(lengths[groups[k]]))
        g = groups[k]
        middle = (g.start + g.stop) // 2
        groups[k: k + 1] = [slice(g.start, middle), slice(middle, g.stop)]
    return groups + [slice(n, n)] * (n_groups - len(groups))


TOLERANCE = 1e-3
"""Relative precision to which ``min_max_split`` finds the smallest largest cost."""


def greedy_split(lengths: np.ndarray, bound: float, model: CostModel, most: int) -> list[slice]:
    """Contiguous groups of the rows of ``lengths``, each as long as its padded cost stays within ``bound`` (at
    least one row); stops after ``most`` groups, the last taking whatever rows remain."""
    groups, start, n = [], 0, len(lengths)
    while start < n:
        if len(groups) == most - 1:
            groups.append(slice(start, n))
            break
        longest = np.maximum.accumulate(lengths[start:], axis=0)  # each sequence's longest so far
        padded = np.arange(1, n - start + 1) * model.costs(longest)  # nondecreasing
        stop = start + max(1, int(np.searchsorted(padded, bound, side="right")))
        groups.append(slice(start, stop))
        start = stop
    return groups


def rank_loads(lengths: np.ndarray, dealt: list[list[np.ndarray]], model: CostModel) -> np.ndarray:
    """(ranks,) padded cost each rank holds of one step (``dealt``: [rank][micro-batch] -> indices)."""
    return np.array([sum(model.padded(np.asarray(lengths)[b]) for b in micro) for micro in dealt], dtype=np.float64)
