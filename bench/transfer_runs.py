"""What the transfer benchmarks share: ``polytrain`` runs in subprocesses and the held-out curves they leave."""

import subprocess
import sys
from pathlib import Path

from polytrain.platform.observe.report import load_run


def polytrain(*args) -> None:
    """``polytrain ARGS`` in a fresh interpreter; a failure ends the benchmark with the run's stderr."""
    done = subprocess.run([sys.executable, "-m", "polytrain.cli", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"polytrain {' '.join(map(str, args[:2]))} failed:\n{done.stderr[-3000:]}")


def curve(run_dir: Path, task: str) -> dict[int, float]:
    """Held-out exact match of ``task`` by step."""
    return dict(zip(*load_run(run_dir).series(f"eval/{task}/exact_match")))


def first_step_reaching(points: dict[int, float], target: float) -> int | None:
    return next((step for step, value in sorted(points.items()) if value >= target), None)
