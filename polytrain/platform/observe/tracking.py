"""Run tracking: a JSONL metrics log, a console progress bar, and Weights & Biases when configured.

Only the main process tracks; the other ranks get an inactive tracker.  ``RUN_DIR/metrics.jsonl`` holds
one line per ``log`` call, ``{"step", "time", <metric>: value, ...}``, plus one ``"event": "start"``
line each time the run starts or resumes, with the config's name and the machine (``system_info``).

On resume the run continues at the checkpoint's step: lines a crashed attempt logged after that step
are dropped from the JSONL log, and the same W&B run id is resumed.  W&B 0.31 records ``resume`` in an
offline run but ``wandb sync`` does not act on it yet (each offline segment uploads as the whole run),
so a W&B run that starts empty (offline, or online with an id the server has not seen) is first sent
the history up to the checkpoint from the JSONL log: the newest segment
(``RUN_DIR/wandb/latest-run``) then holds the whole run, one row per step.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import sys
import time
from importlib import metadata
from pathlib import Path

import torch
from tqdm import tqdm

from polytrain import atomic
from polytrain.config.tracking import TrackingConfig, WandbConfig
from polytrain.errors import DataError
from polytrain.platform.observe.run_dir import RunDir

log = logging.getLogger(__name__)

START = "start"
"""The ``event`` of the line written when a run starts or resumes."""


def system_info(world_size: int, device: torch.device) -> dict:
    """The machine of the main process and the library versions, for the logs."""
    versions = {name: version(name) for name in ("polytrain", "torch", "deepspeed", "accelerate", "wandb")}
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            **versions, "cuda": torch.version.cuda, "world_size": world_size, "nodes": max(1, world_size // local),
            "device": device.type}
    if device.type == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["devices"] = sorted({f"{names.count(n)} x {n}" for n in names})
        info["cudnn"] = torch.backends.cudnn.version()
    else:
        info["devices"] = [f"{os.cpu_count()} CPU cores ({platform.machine()})"]
    return info


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def read_metrics(path: Path) -> list[dict]:
    """Every line of a metrics log, in order; a line that is not JSON is a ``DataError`` naming it."""
    return parse_lines(path.read_text(encoding="utf-8"), path)


def parse_lines(text: str, path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows


def keep_until(path: Path, step: int) -> list[dict]:
    """Drop the lines logged after ``step`` (by an attempt that did not reach its next checkpoint), and a last
    line without its newline (a write the killed attempt did not finish); returns the lines kept."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    whole = text[:text.rfind("\n") + 1]
    lines = parse_lines(whole, path)
    kept = [line for line in lines if line["step"] <= step]
    if len(kept) < len(lines) or whole != text:
        log.warning("%s: dropping %d line(s) logged after step %d, which the resumed run trains again%s", path,
                    len(lines) - len(kept), step, ", and an unfinished last line" if whole != text else "")
        atomic.write_text(path, "".join(json.dumps(line) + "\n" for line in kept))
    return kept


class Tracker:
    """Writes the metrics of the main process to the JSONL log, the progress bar and W&B."""

    def __init__(self, cfg: TrackingConfig, run_dir: RunDir, config: dict, total_steps: int, active: bool,
                 wandb_id: str | None = None, start_step: int = 0, config_name: str = "run", world_size: int = 1,
                 device: torch.device = torch.device("cpu")):
        self.cfg, self.active = cfg, active
        self.wandb = None
        self.bar = None
        if not active:
            return
        history = keep_until(run_dir.metrics, start_step)
        self.metrics = run_dir.metrics.open("a", encoding="utf-8")
        system = system_info(world_size, device)
        self.write({"step": start_step, "time": time.time(), "event": START, "config_name": config_name,
                    "system": system})
        log.info("%s on %s: %s, torch %s, deepspeed %s", config_name, system["hostname"],
                 ", ".join(system["devices"]), system["torch"], system["deepspeed"])
        if cfg.progress_bar:
            # In a terminal the bar redraws in place; piped into a log, one line every 30 s is plenty.
            interactive = sys.stderr.isatty()
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=0.1 if interactive else 30.0, maxinterval=60.0)
        if cfg.wandb.mode != "disabled":
            self.start_wandb(cfg.wandb, run_dir, config, wandb_id, start_step, history, system)

    def start_wandb(self, cfg: WandbConfig, run_dir: RunDir, config: dict, wandb_id: str | None, start_step: int,
                    history: list[dict], system: dict) -> None:
        import wandb

        self.wandb = wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or run_dir.path.name,
                                tags=cfg.tags, group=cfg.group, mode=cfg.mode, dir=str(run_dir.path), config=config,
                                id=wandb_id, resume="allow" if wandb_id else None)
        self.wandb.config.update({"system": system}, allow_val_change=True)
        if self.wandb.starting_step == 0:  # a new W&B run (or offline segment) of a run that may have history
            for line in history:
                if "event" not in line:
                    self.wandb.log({k: v for k, v in line.items() if k not in ("step", "time")}, step=line["step"])
        elif self.wandb.starting_step > start_step + 1:
            log.warning("W&B run %s already holds steps up to %d, logged after the checkpoint at step %d; W&B "
                        "ignores rows for steps it has, so steps %d-%d keep the interrupted attempt's values",
                        wandb_id, self.wandb.starting_step - 1, start_step, start_step + 1,
                        self.wandb.starting_step - 1)

    @property
    def wandb_id(self) -> str | None:
        return None if self.wandb is None else self.wandb.id

    def write(self, line: dict) -> None:
        self.metrics.write(json.dumps(line) + "\n")
        self.metrics.flush()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self.write({"step": step, "time": time.time(), **metrics})
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def progress(self, step: int, loss: float, rates: dict[str, float]) -> None:
        """Move the bar to ``step`` showing the loss, tokens/s and MFU (where known); tqdm adds the ETA."""
        if self.bar is not None:
            postfix = {"loss": f"{loss:.3f}", "tok/s": tqdm.format_sizeof(rates["tokens_per_s"])}
            if "mfu" in rates:
                postfix["mfu"] = f"{rates['mfu']:.1%}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()
