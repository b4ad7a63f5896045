"""What a run resumes besides weights and optimizer shards: objects with ``state_dict`` / ``load_state_dict``.

Each part contributes its own top-level keys to ``trainer_state.json`` (one
JSON object per checkpoint, read once at resume); the RNG states are per rank
and go to their own files (``rng/rank<r>.*``), in JSON and safetensors, never
a pickle.  The learning-rate scheduler is torch's own stateful object.
"""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from polytrain.platform.data.order import StreamState


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    """The optimizer steps done, and where the job's data stream stands after them."""

    step: int = 0
    stream: StreamState = field(default_factory=StreamState)

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": sum(self.stream.positions.values()),
                "stream": {"slot": self.stream.slot, "positions": self.stream.positions}}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.stream = StreamState(state["stream"]["slot"], state["stream"]["positions"], self.step)


@dataclass
class SchedulerState:
    """The LR schedule; on load, every parameter group gets the rate its next step uses."""

    scheduler: torch.optim.lr_scheduler.LRScheduler
    optimizer: torch.optim.Optimizer

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr


@dataclass
class TrackingState:
    """The W&B run id, so a resumed run continues the same W&B run."""

    wandb_id: str | None = None

    def state_dict(self) -> dict:
        return {"wandb_id": self.wandb_id}

    def load_state_dict(self, state: dict) -> None:
        self.wandb_id = state.get("wandb_id")


class TrainerState:
    """The named parts of a run's resumable state, saved and loaded together."""

    def __init__(self, **parts: Stateful):
        self.parts = parts

    def state_dict(self) -> dict:
        merged: dict = {}
        for part in self.parts.values():
            merged.update(part.state_dict())
        return merged

    def load_state_dict(self, state: dict) -> None:
        for part in self.parts.values():
            part.load_state_dict(state)


def read_state(path: Path) -> dict:
    """A checkpoint's ``trainer_state.json``."""
    return json.loads(path.read_text())


def rng_files(directory: Path, rank: int) -> list[Path]:
    """The files ``save_rng`` writes for ``rank``."""
    return [directory / f"rank{rank}.json", directory / f"rank{rank}.safetensors"]


def save_rng(directory: Path, rank: int) -> None:
    """This rank's python, numpy and torch generator states (JSON and safetensors, no pickle)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (directory / f"rank{rank}.json").write_text(json.dumps({
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, directory / f"rank{rank}.safetensors")


def restore_rng(directory: Path, rank: int) -> bool:
    """Restore what ``save_rng`` wrote for ``rank``; False if the checkpoint has no state for it."""
    path = directory / f"rank{rank}.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(directory / f"rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    return True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
