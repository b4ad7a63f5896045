"""One optimizer step, without DeepSpeed: a step whose fp16 gradients overflow is skipped, counted, and holds the
learning-rate schedule where it was (the logic ``test_fp16_overflow_steps_are_skipped_and_counted`` checks end to
end, here on any CPU: fp16 overflow is a cast of the scaled gradient to torch.float16, which every CPU can do);
outside fp16 such a step, or one whose loss is not finite, is a bad step; and the guard DeepSpeed's plain fp32
stage-0 step gets."""

import math
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from polytrain.config.train import TrainConfig
from polytrain.platform.data.loader import MicroBatch
from polytrain.platform.data.order import Slot
from polytrain.platform.distributed.engine import guard_step
from polytrain.platform.train.optimizer import group_lr_multiplier, param_groups
from polytrain.platform.train.step import Stepper
from polytrain.tokens import Segment, TaskBatch, text_tokens


class LossScalingEngine:
    """The engine's part of an fp16 step, as DeepSpeed does it on one process: the loss is scaled, the gradients
    are checked in fp16 range; on overflow the update is skipped, counted and the scale halved."""

    world_size, rank, device, loss_scaling = 1, 0, torch.device("cpu"), True

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scale: float):
        self.model, self.optimizer, self.scale, self.skipped = model, optimizer, scale, 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(torch.float64)

    def accumulate(self, model):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale).backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if any(not torch.isfinite(g.half()).all() for g in grads):
            self.skipped += 1
            self.scale /= 2
        else:
            for g in grads:
                g.div_(self.scale)
            self.optimizer.step()
        self.optimizer.zero_grad()

    def skipped_steps(self) -> int:
        return self.skipped

    def grad_norm(self) -> float:
        return 0.0


class Regression(torch.nn.Module):
    """One task, ``t``: squared error of a linear map of the text ids, per labelled token."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(1, 1)
        torch.nn.init.zeros_(self.w.weight)
        torch.nn.init.zeros_(self.w.bias)

    def forward(self, parts: dict[str, TaskBatch]) -> dict[str, torch.Tensor]:
        part = parts["t"]
        prediction = self.w(part.inputs.values.float()[..., None])[..., 0]
        loss = ((prediction - part.labels.float()) ** 2).mean()
        return {"t": loss * math.nan if "poison" in part.sample_ids else loss}  # a sample whose loss is not finite


def micro_batch(ids: list[int], sample: str = "s0") -> MicroBatch:
    inputs = Segment.collate([text_tokens(ids)])
    return MicroBatch({"t": TaskBatch(inputs, torch.tensor([ids]) * 3, sample_ids=[sample])}, [], Slot(0, {"t": [0]}))


def regression_stepper(cfg: TrainConfig, scale: float, loss_scaling: bool):
    model = Regression()
    groups = param_groups(model, 0.0)
    optimizer = torch.optim.SGD(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [partial(group_lr_multiplier, group=g, cfg=cfg)
                                                              for g in groups])
    engine = LossScalingEngine(model, optimizer, scale=scale)
    engine.loss_scaling = loss_scaling
    no_op = SimpleNamespace(step=lambda: None, zero_grad=lambda: None)  # DeepSpeed steps inside backward()
    return model, engine, scheduler, Stepper(engine, model, no_op, scheduler, cfg, {"t": 1.0},
                                             TaskStandIns(micro_batch([1]).tasks), SimpleNamespace(known=False))


class TaskStandIns:
    """``StandIns`` for a model without embedders: a task a rank has no sample of runs on a stand-in batch."""

    def __init__(self, batches):
        self.batches = batches

    def complete(self, tasks):
        return {task: tasks.get(task, batch) for task, batch in self.batches.items()}

    def zero_term(self):
        return 0.0


def test_an_overflowing_step_is_skipped_counted_and_holds_the_schedule():
    cfg = TrainConfig(steps=10, lr=0.01, warmup_steps=4)
    # At w = b = 0 the loss is 67.5 and d/dw is -45: scaled by 2**15 .. 2**11 it exceeds fp16's 65504, by 2**10 not.
    model, engine, scheduler, stepper = regression_stepper(cfg, scale=2.0**15, loss_scaling=True)
    results, weights = [], []
    for step in range(1, 11):
        weights.append(model.w.weight.detach().clone())
        results.append(stepper([micro_batch([1, 2, 3, 4])], step))
    skipped = [r.skipped for r in results]
    assert skipped[:5] == [True] * 5 and not any(skipped[5:])
    assert [r.metrics["skipped_steps"] for r in results] == [1, 2, 3, 4, 5, 5, 5, 5, 5, 5]
    for i in range(5):  # nothing moved, and the schedule waited: every skipped step used warmup's first rate
        assert torch.equal(weights[i + 1], weights[0])
        assert results[i].metrics["lr"] == pytest.approx(cfg.lr / cfg.warmup_steps)
    lrs = [r.metrics["lr"] for r in results[5:]]
    assert lrs[:4] == pytest.approx([cfg.lr * k / cfg.warmup_steps for k in (1, 2, 3, 4)])  # warmup resumes
    assert scheduler.last_epoch == 5 and not torch.equal(weights[-1], weights[0]) and engine.scale == 2.0**10
    assert not any(r.nonfinite for r in results)  # fp16 overflows are routine, not bad steps


def test_a_step_whose_loss_or_gradient_is_not_finite_is_a_bad_step_skipped_and_logged(caplog):
    cfg = TrainConfig(steps=10, lr=0.01, warmup_steps=4)
    model, engine, scheduler, stepper = regression_stepper(cfg, scale=1.0, loss_scaling=False)
    before = model.w.weight.detach().clone()
    with caplog.at_level("WARNING"):
        poisoned = stepper([micro_batch([3, 4], "poison")], 1)
    assert poisoned.skipped and poisoned.nonfinite == ["t"] and math.isnan(poisoned.metrics["loss"])
    assert torch.equal(model.w.weight, before) and scheduler.last_epoch == 0  # nothing moved, the schedule waited
    assert "step 1: the loss of micro-batch 0 on rank 0 is not finite (t=nan); samples {'t': ['poison']}" in caplog.text
    good = stepper([micro_batch([1, 2])], 2)
    assert not good.skipped and not good.nonfinite and not torch.equal(model.w.weight, before)
    # a finite loss whose gradient is not (here: beyond fp16, with no loss scaling to blame): a bad step too
    model, engine, scheduler, stepper = regression_stepper(cfg, scale=2.0**15, loss_scaling=False)
    overflow = stepper([micro_batch([1, 2, 3, 4])], 1)
    assert overflow.skipped and overflow.nonfinite == ["grad_norm"] and math.isfinite(overflow.metrics["loss"])


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_the_stage_0_fp32_step_drops_non_finite_gradients_and_clips_finite_ones(grad_clip):
    layer, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    reference.load_state_dict(layer.state_dict())
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    guard_step(optimizer, grad_clip)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.weight.grad, layer.bias.grad = torch.full((2, 3), math.inf), torch.ones(2)
    optimizer.step()
    assert optimizer.overflow and optimizer._global_grad_norm == math.inf and not optimizer.state
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())  # no weight, no Adam state moved
    for model in (layer, reference):
        model.weight.grad, model.bias.grad = torch.arange(6.0).view(2, 3), torch.ones(2)
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), grad_clip) if grad_clip else torch.tensor(
        math.sqrt(sum(i * i for i in range(6)) + 2))
    optimizer.step()
    assert not optimizer.overflow and optimizer._global_grad_norm == pytest.approx(float(norm))
    torch.optim.AdamW(reference.parameters(), lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(layer.parameters(), reference.parameters()))
