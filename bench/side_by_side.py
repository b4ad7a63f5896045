"""Timing several training steps side by side: they take turns, so all see the same machine conditions."""

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    wall: float
    """Median wall-clock seconds per step."""
    cpu: float
    """Median CPU seconds per step of this process, all threads (the work done, whatever else shares the machine)."""


def race(steps: dict[str, Callable[[], None]], n_steps: int, warmup: int = 3,
         sync: Callable[[], None] = lambda: None) -> dict[str, Timing]:
    """Median times per step of each entry, the entries taking turns (order rotated every round).

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` on a GPU) before each clock read.
    """
    for run in steps.values():
        for _ in range(warmup):
            run()
    walls: dict[str, list[float]] = {name: [] for name in steps}
    cpus: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(n_steps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            steps[name]()
            sync()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    return {name: Timing(statistics.median(walls[name]), statistics.median(cpus[name])) for name in steps}
