"""Timing several training steps side by side: they take turns, so all see the same machine conditions."""

import statistics
import time
from typing import Callable


def race(steps: dict[str, Callable[[], None]], n_steps: int, warmup: int = 3,
         sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per step of each entry, the entries taking turns (order rotated every round).

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` on a GPU) before each clock read.
    """
    for run in steps.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(n_steps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            sync()
            began = time.perf_counter()
            steps[name]()
            sync()
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(t) for name, t in times.items()}
