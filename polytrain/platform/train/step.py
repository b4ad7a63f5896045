"""One optimizer step: ``grad_accum`` micro-batches, loss normalization across ranks, backward, the schedule.

Each task's loss is normalized by its labelled tokens in the whole step (all
micro-batches of all ranks), so the gradient does not depend on how the
step's samples are split into micro-batches and processes.  A step the
engine skipped (its gradients were not finite) changed no weight, so the
learning-rate schedule does not advance either.

A step whose loss or gradient norm is not finite is skipped, on every rank
alike.  The engine refuses a non-finite global gradient norm itself
(``Engine.skipped_steps``); a micro-batch whose loss is not finite is
backpropagated times NaN, so every gradient it adds is NaN and the norm, taken
over all ranks, is too: the ranks agree through the reductions the step makes
anyway.  Outside fp16, where overflows are routine, a skipped step is a bad
one (``StepResult.nonfinite``); each rank logs the task and the sample ids of
the micro-batch whose loss was not finite.
"""

import logging
import math
from dataclasses import dataclass

import torch

from polytrain.config.train import TrainConfig
from polytrain.models.flops import TrainFlops, input_tokens
from polytrain.platform.data.loader import MicroBatch
from polytrain.platform.distributed.stand_ins import StandIns
from polytrain.platform.train.optimizer import lr_multiplier
from polytrain.tokens import IGNORE_INDEX, TaskBatch

log = logging.getLogger(__name__)
LOGGED_IDS = 20
"""Sample ids named per task when a micro-batch's loss is not finite."""


@dataclass
class StepResult:
    metrics: dict[str, float]
    """loss, loss/<task>, lr, grad_norm, skipped_steps, target_tokens, padding/<task>, rank_load (the most loaded
    rank's slots, padding included, over the mean)."""
    samples: int
    """Samples of the step on all ranks, stand-ins not counted."""
    tokens: int
    """Input tokens of the step's samples on all ranks (``flops.input_tokens``), stand-ins not counted."""
    flops: float | None
    """Model FLOPs of those samples; None where a head has no FLOP count."""
    skipped: bool
    """The engine skipped the optimizer update: the gradients were not finite (an fp16 overflow, or a bad step)."""
    stop: bool
    """Some rank asked to stop after this step (it got SIGTERM or SIGUSR1): every rank sees the same."""
    nonfinite: list[str]
    """What was not finite on some rank, when the step is a bad one: the tasks whose loss was not, else the
    gradient norm ("grad_norm"). Empty for a good step and for an fp16 overflow."""


class Stepper:
    """Runs optimizer steps of the model the engine prepared."""

    def __init__(self, engine, model, optimizer, scheduler, cfg: TrainConfig, weights: dict[str, float],
                 stand_ins: StandIns, flops: TrainFlops):
        self.engine, self.model, self.optimizer, self.scheduler = engine, model, optimizer, scheduler
        self.cfg, self.weights, self.flops = cfg, weights, flops
        self.stand_ins = stand_ins
        """What a rank's micro-batch lacks (a task, a span modality) runs on a stand-in, at zero loss weight, so
        every rank uses every parameter (``platform/distributed/stand_ins.py``)."""

    def __call__(self, micro: list[MicroBatch], step: int, stop: bool = False) -> StepResult:
        """One optimizer step on this rank's ``micro``-batches; ``stop``: this rank wants to stop after it."""
        accum, world, tasks = self.cfg.grad_accum, self.engine.world_size, list(self.weights)
        counts = torch.tensor([[labelled(b.tasks[t]) if t in b.tasks else 0 for t in tasks] for b in micro],
                              dtype=torch.float64)
        work = torch.tensor([sum(len(part.sample_ids) for b in micro for part in b.tasks.values()),
                             sum(input_tokens(part) for b in micro for part in b.tasks.values()),
                             sum(self.flops(b.tasks) for b in micro) if self.flops.known else 0], dtype=torch.float64)
        slots = torch.tensor([[sum(slot_counts(b.tasks[t])[i] for b in micro if t in b.tasks) for i in (0, 1)]
                              for t in tasks], dtype=torch.float64)
        load = torch.zeros(world, dtype=torch.float64)  # every rank's slots, padding included
        load[self.engine.rank] = slots[:, 1].sum()
        totals = self.engine.sum(counts.sum(0)).clamp(min=1)
        loss_sums = torch.zeros(len(tasks), dtype=torch.float64)
        skipped_before = self.engine.skipped_steps()
        for index, (batch, n) in enumerate(zip(micro, counts)):
            parts = {t: part.to(self.engine.device) for t, part in self.stand_ins.complete(batch.tasks).items()}
            with self.engine.accumulate(self.model):
                losses = self.model(parts)
                values = torch.tensor([float(losses[t].detach()) for t in tasks], dtype=torch.float64)
                factors = n * world * accum / totals  # DeepSpeed divides by accum and averages over ranks
                total = sum(self.weights[t] * losses[t] * float(factors[i]) for i, t in enumerate(tasks)) + \
                    self.stand_ins.zero_term()
                if not bool(torch.isfinite(values).all()):
                    self.log_nonfinite(step, index, batch, dict(zip(tasks, values.tolist())))
                    total = total * math.nan  # every gradient NaN: the step's norm is, on every rank
                self.engine.backward(total)
            loss_sums += values * n
        self.optimizer.step()  # under DeepSpeed these two are no-ops: backward() stepped at the boundary
        self.optimizer.zero_grad()
        # The schedule's rate this step used (parameter groups apply their lr_scale and start step to it).
        lr = self.cfg.lr * lr_multiplier(self.scheduler.state_dict()["last_epoch"], self.cfg)
        skipped = self.engine.skipped_steps() > skipped_before
        if not skipped:
            self.scheduler.step()
        # One all-reduce for the losses, the work, the slots and the load of every rank, and the ranks that want
        # to stop.
        reduced = self.engine.sum(torch.cat([loss_sums, work, slots.flatten(), load,
                                             torch.tensor([float(stop)], dtype=torch.float64)]))
        task_losses = dict(zip(tasks, (reduced[:len(tasks)] / totals).tolist()))
        samples, tokens, flops = reduced[len(tasks): len(tasks) + 3].tolist()
        real, filled = reduced[len(tasks) + 3: 3 * len(tasks) + 3].view(len(tasks), 2).T
        load = reduced[3 * len(tasks) + 3:-1]
        loss = sum(self.weights[t] * v for t, v in task_losses.items())
        nonfinite = [t for t, v in task_losses.items() if not math.isfinite(v)]
        if skipped and not nonfinite and not self.engine.loss_scaling:
            nonfinite = ["grad_norm"]
        metrics = {"loss": loss, **{f"loss/{t}": v for t, v in task_losses.items()}, "lr": lr,
                   "grad_norm": self.engine.grad_norm(), "skipped_steps": self.engine.skipped_steps(),
                   "target_tokens": int(totals.sum()), "rank_load": float(load.max() / load.mean().clamp(min=1)),
                   **{f"padding/{t}": 1.0 - float(real[i] / filled[i].clamp(min=1)) for i, t in enumerate(tasks)}}
        return StepResult(metrics, int(samples), int(tokens), flops if self.flops.known else None, skipped,
                          bool(reduced[-1]), nonfinite)

    def log_nonfinite(self, step: int, index: int, batch: MicroBatch, losses: dict[str, float]) -> None:
        bad = {t: v for t, v in losses.items() if not math.isfinite(v)}
        samples = {t: batch.tasks[t].sample_ids[:LOGGED_IDS] for t in bad if t in batch.tasks}
        log.warning("step %d: the loss of micro-batch %d on rank %d is not finite (%s); samples %s; the step is "
                    "skipped", step, index, self.engine.rank, ", ".join(f"{t}={v}" for t, v in bad.items()), samples)


def slot_counts(part: TaskBatch) -> tuple[int, int]:
    """(real tokens, slots) of a task's batch, its encoder input included: what padding wastes is the rest."""
    segments = [part.inputs] + ([part.source] if part.source is not None else [])
    return sum(int(s.mask.sum()) for s in segments), sum(s.mask.numel() for s in segments)


def labelled(part: TaskBatch) -> int:
    """Positions that carry a loss in ``part``."""
    return int((part.labels != IGNORE_INDEX).sum())
