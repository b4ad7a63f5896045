"""One optimizer step: ``grad_accum`` micro-batches, loss normalization across ranks, backward, the schedule.

Each task's loss is normalized by its labelled tokens in the whole step (all
micro-batches of all ranks), so the gradient does not depend on how the
step's samples are split into micro-batches and processes.  A step the
engine skipped (an fp16 loss-scale overflow: the gradients were not finite)
changed no weight, so the learning-rate schedule does not advance either.
"""

import math
from dataclasses import dataclass

import torch

from polytrain.models.flops import TrainFlops, input_tokens
from polytrain.platform.data.loader import MicroBatch
from polytrain.platform.train.config import TrainConfig
from polytrain.platform.train.optimizer import lr_multiplier
from polytrain.tokens import IGNORE_INDEX, TaskBatch


@dataclass
class StepResult:
    metrics: dict[str, float]
    """loss, loss/<task>, lr, grad_norm, skipped_steps, target_tokens."""
    tokens: int
    """Input tokens of the step's samples on all ranks (``flops.input_tokens``), stand-ins not counted."""
    flops: float | None
    """Model FLOPs of those samples; None where a head has no FLOP count."""
    skipped: bool
    """The engine skipped the optimizer update (fp16 overflow)."""


class Stepper:
    """Runs optimizer steps of the model the engine prepared."""

    def __init__(self, engine, model, optimizer, scheduler, cfg: TrainConfig, weights: dict[str, float],
                 stand_ins: dict[str, TaskBatch], flops: TrainFlops):
        self.engine, self.model, self.optimizer, self.scheduler = engine, model, optimizer, scheduler
        self.cfg, self.weights, self.flops = cfg, weights, flops
        self.stand_ins = stand_ins
        """With sampled mixing a rank may get no sample of a task; it then runs that task on a stand-in with
        zero loss weight, so every rank uses every parameter (ZeRO-3 gathers stay in step)."""

    def __call__(self, micro: list[MicroBatch], step: int) -> StepResult:
        accum, world, tasks = self.cfg.grad_accum, self.engine.world_size, list(self.weights)
        counts = torch.tensor([[labelled(b.tasks[t]) if t in b.tasks else 0 for t in tasks] for b in micro],
                              dtype=torch.float64)
        work = torch.tensor([sum(input_tokens(part) for b in micro for part in b.tasks.values()),
                             sum(self.flops(b.tasks) for b in micro) if self.flops.known else 0], dtype=torch.float64)
        slots = torch.tensor([[sum(slot_counts(b.tasks[t])[i] for b in micro if t in b.tasks) for i in (0, 1)]
                              for t in tasks], dtype=torch.float64)
        totals = self.engine.sum(counts.sum(0)).clamp(min=1)
        loss_sums = torch.zeros(len(tasks), dtype=torch.float64)
        skipped_before = self.engine.skipped_steps()
        for batch, n in zip(micro, counts):
            parts = {t: batch.tasks.get(t, self.stand_ins[t]).to(self.engine.device) for t in tasks}
            with self.engine.accumulate(self.model):
                losses = self.model(parts)
                factors = n * world * accum / totals  # DeepSpeed divides by accum and averages over ranks
                self.engine.backward(sum(self.weights[t] * losses[t] * float(factors[i]) for i, t in enumerate(tasks)))
            loss_sums += torch.tensor([float(losses[t].detach()) for t in tasks], dtype=torch.float64) * n
        self.optimizer.step()  # under DeepSpeed these two are no-ops: backward() stepped at the boundary
        self.optimizer.zero_grad()
        # The schedule's rate this step used (parameter groups apply their lr_scale and start step to it).
        lr = self.cfg.lr * lr_multiplier(self.scheduler.state_dict()["last_epoch"], self.cfg)
        skipped = self.engine.skipped_steps() > skipped_before
        if not skipped:
            self.scheduler.step()
        # One all-reduce for the losses, the work and the slots.
        reduced = self.engine.sum(torch.cat([loss_sums, work, slots.flatten()]))
        task_losses = dict(zip(tasks, (reduced[:len(tasks)] / totals).tolist()))
        real, filled = reduced[len(tasks) + 2:].view(len(tasks), 2).T
        loss = sum(self.weights[t] * v for t, v in task_losses.items())
        if not math.isfinite(loss) and not skipped:
            raise FloatingPointError(f"loss is {loss} at step {step}; per task: {task_losses}")
        metrics = {"loss": loss, **{f"loss/{t}": v for t, v in task_losses.items()}, "lr": lr,
                   "grad_norm": self.engine.grad_norm(), "skipped_steps": self.engine.skipped_steps(),
                   "target_tokens": int(totals.sum()),
                   **{f"padding/{t}": 1.0 - float(real[i] / filled[i].clamp(min=1)) for i, t in enumerate(tasks)}}
        tokens, flops = reduced[len(tasks)], reduced[len(tasks) + 1]
        return StepResult(metrics, int(tokens), float(flops) if self.flops.known else None, skipped)


def slot_counts(part: TaskBatch) -> tuple[int, int]:
    """(real tokens, slots) of a task's batch, its encoder input included: what padding wastes is the rest."""
    segments = [part.inputs] + ([part.source] if part.source is not None else [])
    return sum(int(s.mask.sum()) for s in segments), sum(s.mask.numel() for s in segments)


def labelled(part: TaskBatch) -> int:
    """Positions that carry a loss in ``part``."""
    return int((part.labels != IGNORE_INDEX).sum())
