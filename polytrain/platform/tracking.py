"""Run tracking: a JSONL metrics log, a console progress bar, and Weights & Biases when configured.

Only the main process tracks; the other ranks get an inactive tracker.
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from polytrain.errors import ConfigError

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = "disabled"
    """offline writes the run under RUN_DIR/wandb for a later ``wandb sync``; online needs a login."""
    project: str = "polytrain"
    entity: str | None = None
    """W&B team or user; null uses the logged-in default."""
    name: str | None = None
    """Display name; null uses the run directory's name."""
    tags: list[str] = field(default_factory=list)
    group: str | None = None


@dataclass(frozen=True)
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    log_every: int = 10
    """Write metrics every this many optimizer steps (and at the last one)."""
    progress_bar: bool = True
    """Show the tqdm bar on the main process."""
    log_samples: bool = False
    """Write the sample ids of every micro-batch to RUN_DIR/samples/rank<r>.jsonl (to audit data order)."""

    def check(self) -> None:
        if self.log_every <= 0:
            raise ConfigError("log_every", self.log_every, "must be > 0")


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_dir: Path, config: dict, total_steps: int, active: bool,
                 wandb_id: str | None = None, start_step: int = 0):
        self.cfg, self.active = cfg, active
        self.wandb = None
        self.bar = None
        if not active:
            return
        self.metrics = (run_dir / METRICS_FILE).open("a", encoding="utf-8")
        if cfg.progress_bar:
            # In a terminal the bar redraws in place; piped into a log, one line every 30 s is plenty.
            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=0.1 if interactive else 30.0, maxinterval=60.0)
        if cfg.wandb.mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity,
                                    name=cfg.wandb.name or run_dir.name, tags=cfg.wandb.tags,
                                    group=cfg.wandb.group, mode=cfg.wandb.mode, dir=str(run_dir),
                                    config=config, id=wandb_id, resume="allow" if wandb_id else None)

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb is None else self.wandb.id

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self.metrics.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def progress(self, step: int, loss: float, samples_per_s: float) -> None:
        """Move the bar to ``step`` (tqdm shows the ETA from its rate)."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{samples_per_s:.0f}", refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
