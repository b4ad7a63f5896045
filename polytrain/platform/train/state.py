"""What a run resumes besides weights and optimizer shards: objects with ``state_dict`` / ``load_state_dict``.

Each part contributes its own top-level keys to ``trainer_state.json`` (one
JSON object per checkpoint, read once at resume; written and read by
``platform/distributed/checkpoint.py``, beside every rank's RNG state).  The
learning-rate scheduler is torch's own stateful object.
"""

import random
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
