"""The optimizer's parameter groups and the learning-rate schedule.

Groups split the trainable parameters by weight decay (none for vectors and
embeddings), learning-rate multiplier and the step they start training at
(fine-tuning's ``lr_scale`` and ``freeze_until``); the schedule is linear
warmup, then cosine, linear or constant, per optimizer step of the whole job.
"""

import math

import torch

from polytrain.config.train import TrainConfig
from polytrain.platform.train.finetune import first_match

NO_DECAY_MARKERS = ("embedders.",)
"""Parameters under these names (and every vector: norms, biases) get no weight decay."""


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then the configured decay; ``step`` counts optimizer steps from 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def param_groups(model: torch.nn.Module, weight_decay: float, lr_scale: dict[str, float] | None = None,
                 starts: dict[str, int] | None = None) -> list[dict]:
    """Trainable parameters grouped by weight decay, learning-rate multiplier (the first ``lr_scale``
    pattern a name matches) and the step they start training at (``starts``, default 1).

    Each group carries ``lr_scale`` and ``start_step`` for ``group_lr_multiplier``; groups are
    ordered by first appearance, so the same model and settings give the same groups.
    """
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim < 2 or name.startswith(NO_DECAY_MARKERS) else weight_decay
        scale = first_match(name, lr_scale or {})
        key = (decay, 1.0 if scale is None else scale, (starts or {}).get(name, 1))
        groups.setdefault(key, {"params": [], "weight_decay": key[0], "lr_scale": key[1], "start_step": key[2]})
        groups[key]["params"].append(param)
    return list(groups.values())


def group_lr_multiplier(step: int, group: dict, cfg: TrainConfig) -> float:
    """The schedule's multiplier for one parameter group: 0 before its start step, then scaled."""
    if step + 1 < group["start_step"]:  # ``step`` counts from 0; the group's start counts optimizer steps from 1
        return 0.0
    return group["lr_scale"] * lr_multiplier(step, cfg)
