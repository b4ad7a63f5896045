"""Training runs for the engine tests: the tiny recipe through the real CLI, and what the runs logged.

Every run goes through ``polytrain train`` (1 process) or ``polytrain launch`` (N gloo processes) in a
fresh interpreter; losses, metrics and the sample ids of every step are read back from the run directory.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

from tests.helpers import REPO, polytrain, read_jsonl

TINY = REPO / "configs" / "tiny.yaml"
STEPS = 20
"""train.steps of the tiny recipe."""
DOUBLE = ("data.tasks.image_to_text.batch_size=8", "data.tasks.text_lm.batch_size=4")
"""One process with these micro-batches has the global batch of two with the recipe's."""


class Runs:
    """Starts tiny-recipe runs under one folder and reads back what they logged."""

    def __init__(self, root, cache):
        self.root, self.cache = root, cache

    def train(self, name, *overrides, procs=1, expect_ok=True, recipe=TINY):
        args = ["launch" if procs > 1 else "train", recipe, f"train.out_dir={self.root}", f"train.run_name={name}",
                f"data.cache_dir={self.cache}", "tracking.log_samples=true", *overrides]
        if procs > 1:
            args.append(f"launch.procs_per_node={procs}")  # one node: torchrun picks a free port itself
        proc = polytrain(*args, cwd=self.root)
        if not expect_ok:
            return proc
        assert proc.returncode == 0, proc.stderr[-4000:]
        (self.root / name / "stderr.log").write_text(proc.stderr)
        return self.root / name

    def resume_copy(self, source, name, step, *overrides, procs=1):
        """Copy ``source`` to ``name`` as it was at ``step`` and resume it there."""
        target = self.root / name
        shutil.copytree(source / "checkpoints" / f"step_{step:08d}", target / "checkpoints" / f"step_{step:08d}")
        shutil.copytree(source / "tokenizer", target / "tokenizer")
        return self.train(name, f"train.resume={target / 'checkpoints' / f'step_{step:08d}'}", *overrides,
                          procs=procs)


def losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row}


def metric(run_dir, key) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_jsonl(run_dir / "metrics.jsonl") if key in row}


def samples(run_dir, rank=None) -> dict[int, dict[str, list[str]]]:
    """Sample ids per step (all micro-batches; all ranks unless ``rank``)."""
    out: dict[int, dict[str, list[str]]] = {}
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        if rank is not None and path.stem != f"rank{rank}":
            continue
        for row in read_jsonl(path):
            for task, ids in row["samples"].items():
                out.setdefault(row["step"], {}).setdefault(task, []).extend(ids)
    return out


def assert_close_curves(a: dict, b: dict, atol: float, steps=None):
    steps = steps or sorted(a)
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst <= atol, f"max |loss difference| {worst:.3g} > {atol} over steps {steps[0]}..{steps[-1]}"


def start(runs: Runs, name: str, *overrides: str, procs: int = 2) -> subprocess.Popen:
    """``polytrain launch`` of the tiny recipe in the background, in its own process group; stderr piped."""
    args = [sys.executable, "-m", "polytrain.cli", "launch", TINY, f"train.out_dir={runs.root}",
            f"train.run_name={name}", f"data.cache_dir={runs.cache}", "tracking.log_samples=true",
            f"launch.procs_per_node={procs}", *overrides]
    return subprocess.Popen(list(map(str, args)), cwd=runs.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def wait_for(condition, job: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert job.poll() is None and time.time() < deadline, "the job ended or stalled before the moment to act"
        time.sleep(0.01)


def trained_steps(run_dir) -> int:
    """The last step the metrics log has a loss for (0 before the first)."""
    path = run_dir / "metrics.jsonl"
    return max((row["step"] for row in read_jsonl(path) if "loss" in row), default=0) if path.is_file() else 0


def rank_pid(job: subprocess.Popen, rank: int) -> int:
    """The pid of the training process of ``rank`` among the launcher's children."""
    import psutil

    return next(child.pid for child in psutil.Process(job.pid).children() if child.environ().get("RANK") == str(rank))


def finish(job: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    """Wait for ``job``; its exit code and stderr (its process group killed if it outlives ``timeout``)."""
    try:
        _, stderr = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    return job.returncode, stderr
