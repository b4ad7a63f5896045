"""LoRA adapters (Hu et al. 2021): a trainable low-rank update beside a frozen linear layer.

``y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T`` with A (rank, in) and
B (out, rank).  B starts at zero, so a freshly adapted model computes exactly
what it did before.  The adapted layer keeps its ``weight`` and ``bias`` under
their old names (a pretrained state dict loads unchanged); the adapters add
``lora_a`` and ``lora_b`` beside them.  ``merge_lora`` folds the update into
``weight`` for export, after which the adapters are gone.

Shape legend: R rank, I in features, O out features.
"""

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytrain.config.model import LoraConfig
from polytrain.errors import ConfigError

ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight gets a trainable rank-``rank`` update."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a weight only to drop it
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)  # the same tensors: pretrained weights load unchanged
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.scale = scale
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device,
                                               dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device,
                                               dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear's own init of a (R, I) weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_a.shape[0]}, scale={self.scale:g}"


def add_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Replace every ``nn.Linear`` whose name matches ``cfg.targets`` by a ``LoraLinear``; returns their names.

    A pattern that adapts nothing is a config mistake, not a no-op.
    """
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    for pattern in cfg.targets:
        if not fnmatch.filter(linears, pattern):
            raise ConfigError("finetune.lora.targets", pattern, "matches no linear layer; names look like "
                              f"{', '.join(list(linears)[:3])}, ...")
    adapted = [name for name in linears if any(fnmatch.fnmatchcase(name, p) for p in cfg.targets)]
    for name in adapted:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoraLinear(linears[name], cfg.rank, cfg.scale, cfg.dropout))
    return adapted


def is_adapter(name: str) -> bool:
    return name.endswith(ADAPTER_SUFFIXES)


def merge_lora(state: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """``state`` with every adapter pair folded into its layer's weight (W + scale * B A) and removed."""
    merged = {name: t for name, t in state.items() if not is_adapter(name)}
    for name in state:
        if name.endswith(".lora_a"):
            layer = name[: -len(".lora_a")]
            a_RI, b_OR = state[name].float(), state[f"{layer}.lora_b"].float()
            weight = state[f"{layer}.weight"]
            merged[f"{layer}.weight"] = (weight.float() + scale * b_OR @ a_RI).to(weight.dtype)
    return merged
