"""The run directory's layout: every file name a run writes, in one place.

    RUN_DIR/
      config.yaml              the resolved config
      metrics.jsonl            one line per logged step, plus a "start" line per start or resume
      eval.json                {"<task>": {"<metric>": value}} after the last step
      init_from.json           what finetune.init_from loaded, left new or ignored
      report.png, report.html  written by ``polytrain report``
      tokenizer/tokenizer.json the text tokenizer
      samples/rank<r>.jsonl    sample ids of every micro-batch (tracking.log_samples)
      wandb/                   W&B's offline or online run files
      checkpoints/latest       names the newest complete checkpoint
      checkpoints/step_00000500/
        model.safetensors      consolidated weights
        deepspeed/zero/        DeepSpeed's per-rank model and optimizer shards
        deepspeed_universal/   the same, converted for another world size (made on demand)
        rng/rank<r>.json, rng/rank<r>.safetensors   RNG states of every rank
        config.yaml, tokenizer.json, trainer_state.json

The README's "Runs and checkpoints" section shows the same tree.
"""

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

SHARD_TAG = "zero"
"""DeepSpeed's tag of a checkpoint's shards: they go to ``<checkpoint>/deepspeed/zero/``."""
CHECKPOINTS = "checkpoints"
LATEST = "latest"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"


def new_run_name(config_name: str) -> str:
    """The run directory's name when ``train.run_name`` is not set: the recipe's name and the start time."""
    return f"{config_name}-{datetime.now():%Y%m%d-%H%M%S}"


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint folder, ``RUN_DIR/checkpoints/step_<N>``."""

    path: Path

    @property
    def weights(self) -> Path:
        return self.path / "model.safetensors"

    @property
    def shards(self) -> Path:
        return self.path / "deepspeed"

    @property
    def universal(self) -> Path:
        return self.path / "deepspeed_universal"

    @property
    def rng(self) -> Path:
        return self.path / "rng"

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    @property
    def state(self) -> Path:
        return self.path / "trainer_state.json"

    @property
    def run(self) -> "RunDir":
        return RunDir(self.path.parent.parent)


@dataclass(frozen=True)
class RunDir:
    """``RUN_DIR``: what a run writes, by name."""

    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def eval(self) -> Path:
        return self.path / "eval.json"

    @property
    def init_report(self) -> Path:
        return self.path / "init_from.json"

    @property
    def report_png(self) -> Path:
        return self.path / "report.png"

    @property
    def report_html(self) -> Path:
        return self.path / "report.html"

    @property
    def tokenizer(self) -> Path:
        return self.path / "tokenizer" / TOKENIZER

    def samples(self, rank: int) -> Path:
        return self.path / "samples" / f"rank{rank}.jsonl"

    @property
    def wandb(self) -> Path:
        return self.path / "wandb"

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def latest(self) -> Path:
        """The file naming the newest complete checkpoint folder."""
        return self.checkpoints / LATEST

    def checkpoint(self, step: int) -> CheckpointDir:
        return CheckpointDir(self.checkpoints / f"step_{step:08d}")
