"""The data order: a pure function of (seed, global slot), dealt round robin, resumable on any world size."""

import pytest

from polytrain.platform.data.balance import CostModel
from polytrain.platform.data.order import Budget, DataOrder, StreamState


def stream(schedule: DataOrder, start: StreamState, rank: int, world: int, n: int) -> list:
    slots = schedule.slots(start, rank, world)
    return [next(slots) for _ in range(n)]


def test_each_epoch_is_a_permutation_then_reshuffled():
    schedule = DataOrder({"a": 7}, {"a": 1}, "fixed", seed=3)
    first, second = ([schedule.index("a", p) for p in range(e * 7, (e + 1) * 7)] for e in range(2))
    assert sorted(first) == sorted(second) == list(range(7)) and first != second


def test_slots_are_dealt_round_robin_and_data_parallel_equals_a_bigger_micro_batch():
    small = DataOrder({"a": 50, "b": 9}, {"a": 2, "b": 1}, "fixed", seed=1)
    big = DataOrder({"a": 50, "b": 9}, {"a": 4, "b": 2}, "fixed", seed=1)
    ranks = [stream(small, StreamState(), rank, 2, 6) for rank in range(2)]
    assert [s.index for s in ranks[0]] == [0, 2, 4, 6, 8, 10] and [s.index for s in ranks[1]][0] == 1
    single = stream(big, StreamState(), 0, 1, 6)
    for step in range(6):  # step m: ranks 0 and 1 together hold exactly what one process with 2b holds
        for task in ("a", "b"):
            assert ranks[0][step].samples[task] + ranks[1][step].samples[task] == single[step].samples[task]


def test_resuming_at_a_slot_continues_the_stream_on_any_world_size():
    schedule = DataOrder({"a": 13, "b": 5}, {"a": 3, "b": 2}, "sampled", seed=4)
    straight = stream(schedule, StreamState(), 0, 1, 12)
    state = schedule.advance(StreamState(), 4)
    assert state.positions == {t: sum(schedule.counts(k)[t] for k in range(4)) for t in ("a", "b")}
    resumed = [stream(schedule, state, rank, 2, 4) for rank in range(2)]
    interleaved = [slot for pair in zip(*resumed) for slot in pair]
    assert [(s.index, s.samples) for s in interleaved] == [(s.index, s.samples) for s in straight[4:12]]


def test_sampled_mixing_draws_in_proportion_and_is_deterministic():
    schedule = DataOrder({"a": 100, "b": 100}, {"a": 3, "b": 1}, "sampled", seed=0)
    counts = [schedule.counts(k) for k in range(400)]
    assert all(c["a"] + c["b"] == 4 for c in counts)
    assert sum(c["a"] for c in counts) / 1600 == pytest.approx(0.75, abs=0.03)
    assert any(c["b"] == 0 for c in counts)  # some micro-batches miss a task entirely
    assert counts == [DataOrder({"a": 100, "b": 100}, {"a": 3, "b": 1}, "sampled", seed=0).counts(k)
                      for k in range(400)]


def budgeted(slots_per_step: int) -> DataOrder:
    """Task ``a`` (skewed lengths) filled to a budget, task ``b`` a fixed count, steps of ``slots_per_step``."""
    lengths = [(40 + (i * 37) % 400, 2 + i % 9) for i in range(300)]
    budget = Budget(step_cost=4 * 2000, bucket_steps=4, model=CostModel(), lengths=lambda i: lengths[i])
    return DataOrder({"a": 300, "b": 50}, {"b": 1}, "fixed", seed=2, budgets={"a": budget},
                     slots_per_step=slots_per_step)


def steps_of(order: DataOrder, start: StreamState, world: int, n_steps: int) -> list[dict[str, list[int]]]:
    """Each step's samples over all ranks (sorted per task), from ``start``."""
    per_rank = [stream(order, start, rank, world, n_steps * order.slots_per_step // world) for rank in range(world)]
    steps = []
    for step in range(n_steps):
        held: dict[str, list[int]] = {}
        for slots in per_rank:
            for slot in slots[step * order.slots_per_step // world: (step + 1) * order.slots_per_step // world]:
                for task, indices in slot.samples.items():
                    held.setdefault(task, []).extend(indices)
        steps.append({task: sorted(ids) for task, ids in held.items()})
    return steps


def test_a_budgeted_step_holds_the_same_samples_on_any_world_size_and_after_a_resume():
    reference = steps_of(budgeted(4), StreamState(), 1, 10)  # one process, 4 micro-batches per step
    for world in (2, 4):  # 2 x 2 and 4 x 1: the same global step, dealt to more ranks
        assert steps_of(budgeted(4), StreamState(), world, 10) == reference
    order = budgeted(4)
    resumed = steps_of(order, order.advance(StreamState(), 6 * 4), 2, 4)  # saved at step 6, which is mid-pool
    assert resumed == reference[6:10]
    taken = [i for step in reference[:8] for i in step["a"]]  # two pools, well within the first epoch
    assert len(taken) == len(set(taken)) and 50 < len(taken) < 300
    costs = [sum(sum(budgeted(1).budgets["a"].lengths(i)) for i in step["a"]) for step in reference]
    assert max(costs) <= 8000 * 1.2 and min(costs) >= 8000 * 0.8  # each step spends about its budget
