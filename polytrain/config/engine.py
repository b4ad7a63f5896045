"""The ``engine`` section: ZeRO stage, precision, offload and communication settings of the DeepSpeed engine."""

from dataclasses import dataclass
from typing import Annotated, Literal

from polytrain.errors import ConfigError
from polytrain.schema import Positive, Range


@dataclass(frozen=True)
class EngineConfig:
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 plain data parallel, 1 shards optimizer states, 2 + gradients, 3 + parameters."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Parameter/activation dtype in training; bf16 and fp16 keep fp32 master weights in the optimizer,
    fp16 adds dynamic loss scaling (steps whose gradients overflow are skipped and counted)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory and step them with DeepSpeed's CPU Adam (ZeRO stage >= 1)."""
    offload_params: bool = False
    """Keep parameters in CPU memory between uses (ZeRO stage 3 only)."""
    initial_loss_scale_power: Annotated[int, Range(ge=0, le=64)] = 16
    """fp16: the loss scale starts at 2**this."""
    loss_scale_window: Positive[int] = 1000
    """fp16: steps without overflow before the loss scale doubles."""
    bucket_size: Positive[int] = 50_000_000
    """Elements per gradient reduce / parameter all-gather bucket (communication granularity)."""
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto picks nccl when CUDA is present, else gloo."""
    sequence_parallel: Positive[int] = 1
    """Processes that share each sample, each computing a slice of every sequence (DeepSpeed-Ulysses sequence
    parallelism: attention exchanges the slices for a slice of the heads, all-to-all). For samples whose
    activations one device cannot hold. A divisor of the job's processes; the data-parallel degree (what reads
    distinct samples) is processes / this. The heads, and key/value heads, of every stack must divide by it."""

    def check(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", self.zero_stage, "must be 0, 1, 2 or 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("offload_optimizer", True, "needs zero_stage >= 1 (ZeRO-Offload shards the optimizer)")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError("offload_params", True, f"needs zero_stage=3, got zero_stage={self.zero_stage}")
