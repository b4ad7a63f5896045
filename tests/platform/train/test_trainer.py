import math
from functools import partial

import pytest
import torch

from polytrain.config.train import TrainConfig
from polytrain.platform.train.optimizer import group_lr_multiplier, lr_multiplier, param_groups


def test_lr_schedule_closed_form():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)


def toy_model():
    return torch.nn.ModuleDict({"embedders": torch.nn.ModuleDict({"text": torch.nn.Embedding(5, 3)}),
                                "fc": torch.nn.Linear(3, 3), "norm": torch.nn.LayerNorm(3)})


def test_no_weight_decay_for_vectors_and_embeddings():
    model = toy_model()
    no_decay, decay = param_groups(model, 0.1)  # in order of first appearance: the embedding comes first
    assert decay["params"] == [model["fc"].weight] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    model["fc"].weight.requires_grad_(False)
    assert [len(g["params"]) for g in param_groups(model, 0.1)] == [4]  # the emptied decay group is dropped


def test_groups_split_by_lr_scale_and_start_step():
    model = toy_model()
    groups = param_groups(model, 0.1, lr_scale={"embedders.*": 10.0, "*": 0.5}, starts={"fc.weight": 4})
    summary = [(len(g["params"]), g["weight_decay"], g["lr_scale"], g["start_step"]) for g in groups]
    assert summary == [(1, 0.0, 10.0, 1), (1, 0.1, 0.5, 4), (3, 0.0, 0.5, 1)]  # fc.bias, norm.weight, norm.bias


def test_group_multiplier_is_zero_before_its_start_then_scaled():
    cfg = TrainConfig(steps=20, warmup_steps=0, schedule="constant")
    group = {"lr_scale": 0.25, "start_step": 4}
    # LambdaLR's step 0 is the first optimizer step: steps 1-3 (scheduler 0-2) do not move the group.
    assert [group_lr_multiplier(s, group, cfg) for s in range(5)] == [0.0, 0.0, 0.0, 0.25, 0.25]


def test_lr_scale_and_delayed_groups_through_adamw():
    """A real AdamW under the per-group LambdaLR, on a loss whose gradient is 1 everywhere: Adam then moves
    every coordinate by exactly lr per step, so each group's displacement is lr x scale x steps it trained."""
    cfg = TrainConfig(steps=10, warmup_steps=0, schedule="constant", lr=0.1)
    model = toy_model()
    groups = param_groups(model, 0.0, lr_scale={"fc.*": 2.0}, starts={"norm.weight": 3})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0, eps=1e-12)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [partial(group_lr_multiplier, group=g, cfg=cfg) for g in groups])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(3):
        opt.zero_grad()
        sum(p.sum() for p in model.parameters()).backward()
        opt.step()
        sched.step()
    moved = {name: float((before[name] - p.detach()).mean()) for name, p in model.named_parameters()}
    assert moved == pytest.approx({"embedders.text.weight": 0.3, "fc.weight": 0.6, "fc.bias": 0.6,
                                   "norm.weight": 0.1, "norm.bias": 0.3}, rel=1e-5)
