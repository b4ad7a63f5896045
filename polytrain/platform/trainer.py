"""The training loop: micro-batches, accumulation, clipping (in DeepSpeed), logging, eval, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from polytrain.errors import ConfigError
from polytrain.platform import recipe
from polytrain.platform.checkpoint import save_checkpoint
from polytrain.platform.data import Mixture, micro_batches
from polytrain.platform.evaluate import evaluate, format_table
from polytrain.platform.tracking import Tracker

if TYPE_CHECKING:
    from polytrain.config import Config

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
NO_DECAY_MARKERS = ("embedders.",)
"""Parameters under these names (and every vector: norms, biases) get no weight decay."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    warmup_steps: int = 100
    """Steps of linear warmup from lr/warmup_steps to lr."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio on the last step."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay for matrices (not embeddings, norms or biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW moment decay rates."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each process."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    seed: int = 0
    """Seeds model init and data order; the same seed gives the same run."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only after the last step)."""
    eval_batch_size: int = 64
    """Held-out samples per evaluation batch."""
    save_every: int = 0
    """Save a checkpoint every this many steps (0: only after the last step)."""
    out_dir: str = "runs"
    """Run directories are created under this folder."""
    run_name: str | None = None
    """Name of the run directory; null: the config file's name and the start time."""

    def check(self) -> None:
        for name in ("steps", "grad_accum", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, getattr(self, name), "must be > 0")
        for name in ("warmup_steps", "eval_every", "save_every", "weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(name, getattr(self, name), "must be >= 0")
        if self.lr <= 0:
            raise ConfigError("lr", self.lr, "must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("betas", self.betas, "each must be in [0, 1)")


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to ``min_lr_ratio``; ``step`` counts optimizer steps from 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.startswith(NO_DECAY_MARKERS) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(cfg: Config, config_name: str) -> Path:
    name = cfg.train.run_name or f"{config_name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir) / name


def train(cfg: Config, config_name: str = "run") -> Path:
    """Train as configured; every process of the job calls this. Returns the run directory."""
    from polytrain.platform.engine import Engine

    micro_batch = sum(task.batch_size for task in cfg.data.tasks.values())
    engine = Engine(cfg.engine, micro_batch, cfg.train.grad_accum, cfg.train.grad_clip)
    try:
        return Trainer(cfg, engine, config_name).run()
    finally:
        engine.close()


class Trainer:
    """One run on one process of the job: its parts are built from the config, then ``run()`` trains."""

    def __init__(self, cfg: Config, engine, config_name: str):
        from polytrain.config import dump_yaml, to_dict  # config.py imports this module

        self.cfg, self.engine = cfg, engine
        self.run_dir = engine.broadcast(new_run_dir(cfg, config_name) if engine.is_main else None)
        self.config_yaml = dump_yaml(cfg)
        if engine.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            log.info("run directory %s (%d process(es), ZeRO stage %d)", self.run_dir, engine.world_size,
                     cfg.engine.zero_stage)
        seed_everything(cfg.train.seed)
        self.tokenizer_file = self.text_tokenizer_file()
        self.tokenizers = recipe.build_tokenizers(cfg, self.tokenizer_file)
        self.text = self.tokenizers["text"]
        self.train_sets = recipe.build_datasets(cfg, "train", self.tokenizers)
        self.val_sets = recipe.build_datasets(cfg, "val", self.tokenizers)
        torch.manual_seed(cfg.train.seed)
        model = recipe.build_model(cfg, self.tokenizers)
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                      betas=cfg.train.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg.train))
        self.model, self.optimizer, self.scheduler = engine.prepare(model, optimizer, scheduler)
        self.weights = {name: task.weight for name, task in cfg.data.tasks.items()}
        self.samples_per_step = (sum(t.batch_size for t in cfg.data.tasks.values()) * cfg.train.grad_accum
                                 * engine.world_size)
        self.tracker = Tracker(cfg.tracking, self.run_dir, to_dict(cfg), cfg.train.steps, engine.is_main)
        if engine.is_main:
            sizes = ", ".join(f"{n} {len(ds)} train / {len(self.val_sets[n])} val" for n, ds in self.train_sets.items())
            log.info("model: %.2fM parameters; data: %s; vocab %d", n_params / 1e6, sizes, self.text.vocab_size)

    def run(self) -> Path:
        cfg = self.cfg
        mixture = Mixture(self.train_sets, {n: t.batch_size for n, t in cfg.data.tasks.items()}, cfg.train.seed,
                          self.engine.rank, self.engine.world_size, self.text.pad_id)
        batches = micro_batches(mixture, 0, cfg.data.num_workers)
        self.model.train()
        start = last_log = time.perf_counter()
        for step in range(1, cfg.train.steps + 1):
            metrics = self.train_step(batches)
            elapsed = time.perf_counter() - start
            metrics["samples_per_s"] = step * self.samples_per_step / elapsed
            self.tracker.progress(step, metrics["loss"], metrics["samples_per_s"])
            if step % cfg.tracking.log_every == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                self.tracker.log(step, {**metrics, "step_time_s": (now - last_log) / cfg.tracking.log_every})
                last_log = now
            if step < cfg.train.steps and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                self.tracker.log(step, flatten_eval(self.evaluate()))
            if step < cfg.train.steps and cfg.train.save_every and step % cfg.train.save_every == 0:
                self.checkpoint(step)
        return self.finish(time.perf_counter() - start)

    def train_step(self, batches) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics."""
        accum = self.cfg.train.grad_accum
        task_losses = {name: 0.0 for name in self.weights}
        target_tokens = 0
        for _ in range(accum):
            batch = next(batches).to(self.engine.device)
            with self.engine.accumulate(self.model):
                losses = self.model(batch.tasks)
                self.engine.backward(sum(self.weights[name] * value for name, value in losses.items()))
            for name, value in losses.items():
                task_losses[name] += float(value.detach()) / accum
            target_tokens += sum(int((part.labels >= 0).sum()) for part in batch.tasks.values())
        self.optimizer.step()  # under DeepSpeed these two are no-ops: backward() stepped at the boundary
        self.optimizer.zero_grad()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        loss = sum(self.weights[name] * value for name, value in task_losses.items())
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at this step; per task: {task_losses}")
        return {"loss": loss, **{f"loss/{n}": v for n, v in task_losses.items()}, "lr": lr,
                "grad_norm": self.engine.grad_norm(), "target_tokens": target_tokens * self.engine.world_size}

    def finish(self, train_seconds: float) -> Path:
        """Final evaluation, checkpoint and eval.json."""
        steps = self.cfg.train.steps
        results = self.evaluate()
        self.tracker.log(steps, {**flatten_eval(results), "train_seconds": train_seconds})
        final = self.checkpoint(steps)
        self.tracker.close()
        if self.engine.is_main:
            (self.run_dir / EVAL_FILE).write_text(json.dumps(results, indent=1) + "\n")
            log.info("trained %d steps in %.1f s; checkpoint %s", steps, train_seconds, final)
            print(format_table(results), flush=True)
            print(f"run directory: {self.run_dir}", flush=True)
        return self.run_dir

    def evaluate(self) -> dict[str, dict[str, float]]:
        return evaluate(self.engine.unwrap(self.model), self.cfg.data.tasks, self.val_sets, self.text,
                        self.engine.device, self.cfg.train.eval_batch_size)

    def checkpoint(self, step: int) -> Path:
        digests = self.engine.replica_digests(self.model)
        if len(set(digests)) > 1:
            raise RuntimeError(f"model replicas diverged by step {step}: parameter digests per rank {digests}")
        return save_checkpoint(self.engine, self.model, self.run_dir, step, self.config_yaml, self.tokenizer_file,
                               {"samples_seen": step * self.samples_per_step, "wandb_id": self.tracker.wandb_id,
                                "replica_sha256": digests})

    def text_tokenizer_file(self) -> Path:
        """The configured tokenizer.json, or one trained now on the main process and shared."""
        with self.engine.main_process_first():  # the main process builds the built-in data first
            for name in self.cfg.data.tasks:
                for split in ("train", "val"):
                    recipe.manifest(self.cfg, name, split)
        if self.cfg.tokenizers.text.path:
            return Path(self.cfg.tokenizers.text.path)
        out = self.run_dir / "tokenizer"
        if self.engine.is_main:
            began = time.perf_counter()
            recipe.train_text_tokenizer(self.cfg, out)
            log.info("trained the text tokenizer in %.1f s", time.perf_counter() - began)
        self.engine.barrier()
        return out / "tokenizer.json"


def flatten_eval(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{metric}": value for task, metrics in results.items() for metric, value in metrics.items()}
