"""Fine-tuning controls: which parameters train.

Patterns are shell-style globs on parameter names (``backbone.*``,
``embedders.text.*``); names are listed by ``model.named_parameters()``.
"""

import fnmatch
import logging
from dataclasses import dataclass, field

from torch import nn

from polytrain.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    freeze: list[str] = field(default_factory=list)
    """Glob patterns of parameter names that do not train (requires_grad off, no optimizer state)."""


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Turn off gradients of the parameters matching ``patterns``; returns their names.

    A pattern that matches nothing is a mistake in the config, not a no-op.
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ConfigError("finetune.freeze", pattern, "matches no parameter; names look like "
                              f"{', '.join(names[:3])}, ...")
    frozen = []
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    if frozen:
        log.info("froze %d of %d parameter tensors (%s)", len(frozen), len(names), ", ".join(patterns))
    return frozen
