"""The ``tracking`` section: the metrics log, the progress bar, W&B, and what the run logs about its data."""

from dataclasses import dataclass, field
from typing import Annotated, Literal

from polytrain.schema import Positive, Range


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    """offline writes the run under RUN_DIR/wandb for a later ``wandb sync``; online needs a login."""
    project: str = "polytrain"
    """W&B project the run belongs to."""
    entity: str | None = None
    """W&B team or user; null uses the logged-in default."""
    name: str | None = None
    """Display name; null uses the run directory's name."""
    tags: list[str] = field(default_factory=list)
    """Labels to filter runs by in the W&B UI."""
    group: str | None = None
    """Groups related runs (e.g. the seeds of one experiment) in the W&B UI; null: no group."""


@dataclass(frozen=True)
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    log_every: Positive[int] = 10
    """Write metrics every this many optimizer steps (and at the last one); rates are over those steps."""
    progress_bar: bool = True
    """Show the tqdm bar (loss, tokens/s, MFU, ETA) on the main process."""
    log_samples: bool = False
    """Write the sample ids of every micro-batch to RUN_DIR/samples/rank<r>.jsonl (to audit data order)."""
    peak_tflops: Annotated[float, Range(gt=0, note="or null: looked up for known GPUs")] | None = None
    """Dense peak of one device in the training precision, in TFLOP/s, for MFU; null: looked up from the
    GPU's name (``polytrain.platform.observe.meters.PEAK_TFLOPS``), and no MFU on CPUs or unlisted GPUs."""
