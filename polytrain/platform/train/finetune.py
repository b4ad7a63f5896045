"""Fine-tuning controls: where the weights start, which parameters train, when, and how fast.

Patterns are shell-style globs on parameter names (``backbone.*``,
``embedders.audio.*``), as ``model.named_parameters()`` lists them.  LoRA
adapters (``*.lora_a``, ``*.lora_b``) always train: ``freeze`` and
``freeze_until`` patterns pass over them, so ``freeze=[backbone.*]`` with LoRA
trains the adapters inside a frozen backbone.
"""

import fnmatch

from torch import nn

from polytrain.config.train import FinetuneConfig
from polytrain.errors import ConfigError
from polytrain.models.lora import add_lora, is_adapter


def adapt(model: nn.Module, cfg: FinetuneConfig) -> list[str]:
    """Give ``model`` the structure fine-tuning needs (LoRA adapters), before any weights are loaded; returns the
    adapted layers."""
    return add_lora(model, cfg.lora) if cfg.lora.rank else []


def describe(cfg: FinetuneConfig, adapted: list[str], starts: dict[str, int], frozen: int, names: int) -> str:
    """One line on what ``adapt`` and ``freeze`` did to a model of ``names`` parameter tensors (logged once)."""
    lines = []
    if adapted:
        lines.append(f"LoRA rank {cfg.lora.rank} on {len(adapted)} linear layers ({', '.join(cfg.lora.targets)})")
    if frozen or starts:
        waiting = ", ".join(f"{p} from {s}" for p, s in cfg.freeze_until.items()) or "-"
        lines.append(f"froze {frozen} of {names} parameter tensors ({', '.join(cfg.freeze) or '-'}); "
                     f"{len(starts)} wait for their step ({waiting})")
    return "; ".join(lines)


def freeze(model: nn.Module, cfg: FinetuneConfig) -> tuple[dict[str, int], int]:
    """Turn off gradients of the parameters ``freeze`` matches; returns {name: first step} of those
    ``freeze_until`` matches (they keep gradients, their learning rate waits), and how many it froze.

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
    return starts, frozen


def check_patterns(key: str, patterns, names: list[str]) -> None:
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError(key, pattern, f"matches no parameter; names look like {', '.join(names[:3])}, ...")


def first_match(name: str, table: dict):
    """The value of the first pattern in ``table`` that ``name`` matches, else None."""
    return next((value for pattern, value in table.items() if fnmatch.fnmatchcase(name, pattern)), None)


