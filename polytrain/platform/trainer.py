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
    def __init__(self, cfg: Config, engine, config_name: str):
        self.cfg, self.engine = cfg, engine
        self.run_dir = engine.broadcast(new_run_dir(cfg, config_name) if engine.is_main else None)
        if engine.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            log.info("run directory %s (%d process(es), ZeRO stage %d)", self.run_dir, engine.world_size,
                     cfg.engine.zero_stage)

    def run(self) -> Path:
        from polytrain.config import dump_yaml, to_dict
        from polytrain.platform import recipe
        from polytrain.platform.checkpoint import save_checkpoint
        from polytrain.platform.data import Mixture, micro_batches
        from polytrain.platform.evaluate import evaluate, format_table
        from polytrain.platform.tracking import Tracker

        cfg, engine, run_dir = self.cfg, self.engine, self.run_dir
        config_yaml = dump_yaml(cfg)
        if engine.is_main:
            (run_dir / "config.yaml").write_text(config_yaml)
        seed_everything(cfg.train.seed)
        tokenizer_file = self.text_tokenizer_file()
        tokenizers = recipe.build_tokenizers(cfg, tokenizer_file)
        text = tokenizers["text"]
        train_sets = recipe.build_datasets(cfg, "train", tokenizers)
        val_sets = recipe.build_datasets(cfg, "val", tokenizers)
        torch.manual_seed(cfg.train.seed)
        model = recipe.build_model(cfg, tokenizers)
        n_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                                      betas=cfg.train.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg.train))
        model, optimizer, scheduler = engine.prepare(model, optimizer, scheduler)
        if engine.is_main:
            sizes = ", ".join(f"{name} {len(ds)} train / {len(val_sets[name])} val" for name, ds in train_sets.items())
            log.info("model: %.2fM parameters; data: %s; vocab %d", n_params / 1e6, sizes, text.vocab_size)

        mixture = Mixture(train_sets, {n: t.batch_size for n, t in cfg.data.tasks.items()}, cfg.train.seed,
                          engine.rank, engine.world_size, text.pad_id)
        batches = micro_batches(mixture, 0, cfg.data.num_workers)
        tracker = Tracker(cfg.tracking, run_dir, to_dict(cfg), cfg.train.steps, engine.is_main)
        weights = {name: task.weight for name, task in cfg.data.tasks.items()}
        samples_per_step = sum(t.batch_size for t in cfg.data.tasks.values()) * cfg.train.grad_accum
        samples_per_step *= engine.world_size
        device = engine.device

        def checkpoint(step: int) -> Path:
            digests = engine.replica_digests(model)
            if len(set(digests)) > 1:
                raise RuntimeError(f"model replicas diverged by step {step}: parameter digests per rank {digests}")
            return save_checkpoint(engine, model, run_dir, step, config_yaml, tokenizer_file,
                                   {"samples_seen": step * samples_per_step, "wandb_id": tracker.wandb_id,
                                    "replica_sha256": digests})

        def run_eval() -> dict:
            return evaluate(engine.unwrap(model), cfg.data.tasks, val_sets, text, device, cfg.train.eval_batch_size)

        model.train()
        start = last_log = time.perf_counter()
        for step in range(1, cfg.train.steps + 1):
            task_losses = {name: 0.0 for name in weights}
            target_tokens = 0
            for _ in range(cfg.train.grad_accum):
                batch = next(batches).to(device)
                with engine.accumulate(model):
                    losses = model(batch.tasks)
                    loss = sum(weights[name] * value for name, value in losses.items())
                    engine.backward(loss)
                for name, value in losses.items():
                    task_losses[name] += float(value.detach()) / cfg.train.grad_accum
                target_tokens += sum(int((part.labels >= 0).sum()) for part in batch.tasks.values())
            optimizer.step()  # under DeepSpeed these two are no-ops: backward() stepped at the boundary
            optimizer.zero_grad()
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            loss_value = sum(weights[n] * v for n, v in task_losses.items())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss is {loss_value} at step {step}: {task_losses}")
            elapsed = time.perf_counter() - start
            tracker.progress(step, loss_value, step * samples_per_step / elapsed)
            if step % cfg.tracking.log_every == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                metrics = {"loss": loss_value, **{f"loss/{n}": v for n, v in task_losses.items()},
                           "lr": lr, "grad_norm": engine.grad_norm(),
                           "samples_per_s": step * samples_per_step / elapsed,
                           "target_tokens": target_tokens * engine.world_size, "step_time_s": now - last_log}
                tracker.log(step, metrics)
                last_log = now
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
                tracker.log(step, flatten_eval(run_eval()))
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                checkpoint(step)

        train_seconds = time.perf_counter() - start
        results = run_eval()
        tracker.log(cfg.train.steps, {**flatten_eval(results), "train_seconds": train_seconds})
        final = checkpoint(cfg.train.steps)
        tracker.close()
        if engine.is_main:
            (run_dir / EVAL_FILE).write_text(json.dumps(results, indent=1) + "\n")
            log.info("trained %d steps in %.1f s; checkpoint %s", cfg.train.steps, train_seconds, final)
            print(format_table(results), flush=True)
            print(f"run directory: {run_dir}", flush=True)
        return run_dir

    def text_tokenizer_file(self) -> Path:
        """The configured tokenizer.json, or one trained now on the main process and shared."""
        from polytrain.platform import recipe

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
