"""Fine-tuning controls: where the weights start, which parameters train, when, and how fast.

Patterns are shell-style globs on parameter names (``backbone.*``,
``embedders.audio.*``), as ``model.named_parameters()`` lists them.  LoRA
adapters (``*.lora_a``, ``*.lora_b``) always train: ``freeze`` and
``freeze_until`` patterns pass over them, so ``freeze=[backbone.*]`` with LoRA
trains the adapters inside a frozen backbone.
"""

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from polytrain.errors import ConfigError, DataError
from polytrain.models.lora import LoraConfig, add_lora, is_adapter

log = logging.getLogger(__name__)

INIT_REPORT = "init_from.json"
"""Written to the run directory: which tensors ``init_from`` loaded, left new, or ignored."""


@dataclass(frozen=True)
class FinetuneConfig:
    init_from: str | None = None
    """Start from these weights: a run directory (its latest checkpoint), a checkpoint folder, or a file
    written by ``polytrain export``. Tensors are matched by name; the text tokenizer comes along."""
    freeze: list[str] = field(default_factory=list)
    """Glob patterns of parameter names that do not train (no gradient, no optimizer state)."""
    freeze_until: dict[str, int] = field(default_factory=dict)
    """Pattern -> optimizer step: matching parameters train only from that step on (gradual unfreezing);
    before it their learning rate is 0. Takes precedence over ``freeze`` for the parameters it matches."""
    lr_scale: dict[str, float] = field(default_factory=dict)
    """Pattern -> multiplier of the learning rate (e.g. a new embedder at 10x, the backbone at 0.1x);
    the first matching pattern counts, unmatched parameters get 1."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters on the targeted linear layers, whose own weights are then frozen."""

    def check(self) -> None:
        for pattern, step in self.freeze_until.items():
            if step < 1:
                raise ConfigError(f"freeze_until.{pattern}", step, "must be an optimizer step >= 1")
        for pattern, scale in self.lr_scale.items():
            if scale < 0:
                raise ConfigError(f"lr_scale.{pattern}", scale, "must be >= 0")


def adapt(model: nn.Module, cfg: FinetuneConfig) -> None:
    """Give ``model`` the structure fine-tuning needs (LoRA adapters), before any weights are loaded."""
    if cfg.lora.rank:
        adapted = add_lora(model, cfg.lora)
        log.info("LoRA rank %d on %d linear layers (%s)", cfg.lora.rank, len(adapted), ", ".join(cfg.lora.targets))


def freeze(model: nn.Module, cfg: FinetuneConfig) -> dict[str, int]:
    """Turn off gradients of the parameters ``freeze`` matches; returns {name: first step} of those
    ``freeze_until`` matches (they keep gradients, their learning rate waits).

    A pattern that matches nothing is a mistake in the config, not a no-op.
    """
    names = [name for name, _ in model.named_parameters() if not is_adapter(name)]
    for key, patterns in (("finetune.freeze", cfg.freeze), ("finetune.freeze_until", cfg.freeze_until)):
        check_patterns(key, patterns, names)
    frozen, starts = 0, {}
    for name, param in model.named_parameters():
        if is_adapter(name) or not param.requires_grad:  # adapters always train; LoRA froze what it adapted
            continue
        start = first_match(name, cfg.freeze_until)
        if start is not None:
            starts[name] = start
        elif any(fnmatch.fnmatchcase(name, pattern) for pattern in cfg.freeze):
            param.requires_grad_(False)
            frozen += 1
    if frozen or starts:
        log.info("froze %d of %d parameter tensors (%s); %d wait for their step (%s)", frozen, len(names),
                 ", ".join(cfg.freeze) or "-", len(starts),
                 ", ".join(f"{p} from {s}" for p, s in cfg.freeze_until.items()) or "-")
    return starts


def check_patterns(key: str, patterns, names: list[str]) -> None:
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(key, pattern, f"matches no parameter; names look like {', '.join(names[:3])}, ...")


def first_match(name: str, table: dict):
    """The value of the first pattern in ``table`` that ``name`` matches, else None."""
    return next((value for pattern, value in table.items() if fnmatch.fnmatchcase(name, pattern)), None)


@dataclass
class InitReport:
    """What ``load_initial_weights`` did, tensor by tensor."""

    source: str
    loaded: list[str]
    new: list[str]
    """In the model, not in the source: left as initialized."""
    ignored: list[str]
    """In the source, not in the model (e.g. a pretraining task's own head)."""

    def write(self, run_dir: Path) -> None:
        (run_dir / INIT_REPORT).write_text(json.dumps(self.__dict__, indent=1) + "\n")

    def summary(self) -> str:
        """One log line; LoRA adapters (always new) are counted rather than listed."""
        new = [name for name in self.new if not is_adapter(name)]
        adapters = f" and {len(self.new) - len(new)} LoRA adapter tensors" if len(new) < len(self.new) else ""
        return (f"init_from {self.source}: loaded {len(self.loaded)} tensors; newly initialized {len(self.new)}: "
                f"{', '.join(new) or '-'}{adapters}; ignored {len(self.ignored)}: {', '.join(self.ignored) or '-'} "
                f"(full lists in {INIT_REPORT})")


def load_initial_weights(model: nn.Module, source: str, weights: dict[str, torch.Tensor]) -> InitReport:
    """Copy the tensors of ``weights`` into ``model`` by name; a shape mismatch stops with the tensor's name."""
    own = model.state_dict()
    mismatched = [f"{name}: {source} has {tuple(weights[name].shape)}, the model {tuple(own[name].shape)}"
                  for name in own if name in weights and weights[name].shape != own[name].shape]
    if mismatched:
        raise DataError(f"init_from: tensor shapes differ, so the checkpoint was trained with another architecture "
                        f"(configure the model as it was): {'; '.join(mismatched[:3])}"
                        + (f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""))
    loaded = [name for name in own if name in weights]
    if not loaded:
        raise DataError(f"init_from: {source} shares no tensor name with this model; it is not a polytrain "
                        f"checkpoint of this kind of model (its tensors look like {', '.join(list(weights)[:3])})")
    with torch.no_grad():
        for name in loaded:
            own[name].copy_(weights[name])
    return InitReport(source, loaded, [n for n in own if n not in weights], [n for n in weights if n not in own])
