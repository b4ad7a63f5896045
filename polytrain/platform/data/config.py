"""The ``data`` section: the tasks a run trains, each with its head, manifests and batch size."""

from dataclasses import dataclass
from typing import Annotated, Literal

from polytrain.errors import ConfigError
from polytrain.models.config import HEADS, head_kind
from polytrain.schema import NonNegative, Positive, Range
from polytrain.tokenizers.config import TOKENIZERS


@dataclass(frozen=True)
class TaskConfig:
    head: str
    """How the task uses the backbone: a name from the head registry (decoder_only, encoder_decoder)."""
    train: str
    """Training manifest: a JSONL path or ``builtin:<name>/<split>``."""
    val: str
    """Held-out manifest, same forms as ``train``."""
    source: str | None = None
    """Modality of the encoder input (encoder_decoder only): a name from the tokenizer registry."""
    batch_size: Positive[int] = 8
    """Samples of this task in every micro-batch, per process."""
    weight: NonNegative[float] = 1.0
    """Multiplier of this task's mean token loss in the total loss."""
    seq_len: Positive[int] = 128
    """decoder_only: tokens per training window cut from the concatenated documents."""
    max_target_len: Positive[int] = 16
    """encoder_decoder: target tokens kept (bos/eos excluded); also the most tokens generated at eval."""
    max_val_samples: Annotated[int, Range(ge=0, note="0 means all")] = 0
    """Evaluate on at most this many held-out samples (0: all)."""

    def check(self) -> None:
        if self.head not in HEADS:
            raise ConfigError("head", self.head, f"unknown head; known: {', '.join(HEADS.names())}")
        needs_source = head_kind(self.head).encoder
        if needs_source and self.source not in TOKENIZERS:
            raise ConfigError("source", self.source, f"head {self.head} needs a source modality; known: "
                                                     f"{', '.join(TOKENIZERS.names())}")
        if not needs_source and self.source is not None:
            raise ConfigError("source", self.source, f"head {self.head} reads text only; leave source unset")


@dataclass(frozen=True)
class DataConfig:
    tasks: dict[str, TaskConfig]
    """Tasks by name; each micro-batch mixes all of them."""
    mixing: Literal["fixed", "sampled"] = "fixed"
    """fixed: every micro-batch holds exactly ``batch_size`` samples of every task. sampled: each
    micro-batch draws sum(batch_size) samples, each from a task with probability batch_size / sum,
    so some micro-batches (and ranks) miss some tasks."""
    cache_dir: str = "build/data"
    """Where the built-in datasets are materialized (relative to the working directory)."""
    num_workers: NonNegative[int] = 0
    """DataLoader worker processes per rank (0: load in the training process)."""
    skip_bad_samples: bool = False
    """Replace unreadable samples by the next readable one (counted and logged) instead of stopping."""

    def check(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks", self.tasks, "needs at least one task")
