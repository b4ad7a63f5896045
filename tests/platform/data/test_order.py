"""The data order: a pure function of (seed, global slot), dealt round robin, resumable on any world size."""

import pytest

from polytrain.platform.data.order import DataOrder, StreamState


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
