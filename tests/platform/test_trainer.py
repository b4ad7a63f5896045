import math

import pytest
import torch

from polytrain.platform.trainer import TrainConfig, lr_multiplier, param_groups


def test_lr_schedule_closed_form():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)


def test_no_weight_decay_for_vectors_and_embeddings():
    model = torch.nn.ModuleDict({"embedders": torch.nn.ModuleDict({"text": torch.nn.Embedding(5, 3)}),
                                 "fc": torch.nn.Linear(3, 3), "norm": torch.nn.LayerNorm(3)})
    decay, no_decay = param_groups(model, 0.1)
    assert decay["params"] == [model["fc"].weight] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    model["fc"].weight.requires_grad_(False)
    assert [len(g["params"]) for g in param_groups(model, 0.1)] == [4]  # the emptied decay group is dropped
