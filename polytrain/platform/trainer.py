"""The training loop: micro-batches, accumulation, loss normalization, logging, eval, checkpoints, resume."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import numpy as np
import torch

from polytrain.errors import ConfigError
from polytrain.models.flops import TrainFlops, input_tokens
from polytrain.platform import recipe
from polytrain.platform.checkpoint import (TOKENIZER, convert_to_universal, latest_checkpoint, read_pretrained,
                                           read_state, restore_rng, save_checkpoint)
from polytrain.platform.data import MicroBatch, Mixture, Schedule, StreamState, micro_batches
from polytrain.platform.evaluate import evaluate, format_table
from polytrain.platform.engine import base_optimizer
from polytrain.platform.finetune import first_match, freeze, load_initial_weights
from polytrain.platform.meters import Throughput, memory_gib, peak_flops
from polytrain.platform.plan import StateProbe
from polytrain.platform.tracking import EVAL_FILE, Tracker
from polytrain.tokens import IGNORE_INDEX, TaskBatch

if TYPE_CHECKING:
    from polytrain.config import Config

log = logging.getLogger(__name__)

NO_DECAY_MARKERS = ("embedders.",)
"""Parameters under these names (and every vector: norms, biases) get no weight decay."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps (the total, counting steps done before a resume)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    warmup_steps: int = 100
    """Steps of linear warmup from lr/warmup_steps to lr."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear down to lr * min_lr_ratio on the last step, or constant."""
    min_lr_ratio: float = 0.1
    """Where cosine and linear decay end, as a fraction of lr."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay for matrices (not embeddings, norms or biases)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW moment decay rates."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each process."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    global_batch: int | None = None
    """If set, the samples per optimizer step the job must have: micro-batch x grad_accum x processes."""
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
    resume: str | None = None
    """Continue the run in this run directory (its latest checkpoint) or from this checkpoint folder,
    on any number of processes."""

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
        if self.global_batch is not None and self.global_batch <= 0:
            raise ConfigError("global_batch", self.global_batch, "must be > 0 (or null: not checked)")


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then the configured decay; ``step`` counts optimizer steps from 0."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay


def param_groups(model: torch.nn.Module, weight_decay: float, lr_scale: dict[str, float] | None = None,
                 starts: dict[str, int] | None = None) -> list[dict]:
    """Trainable parameters grouped by weight decay, learning-rate multiplier (the first ``lr_scale``
    pattern a name matches) and the step they start training at (``starts``, default 1).

    Each group carries ``lr_scale`` and ``start_step`` for ``group_lr_multiplier``; groups are
    ordered by first appearance, so the same model and settings give the same groups.
    """
    groups: dict[tuple, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = 0.0 if param.ndim < 2 or name.startswith(NO_DECAY_MARKERS) else weight_decay
        scale = first_match(name, lr_scale or {})
        key = (decay, 1.0 if scale is None else scale, (starts or {}).get(name, 1))
        groups.setdefault(key, {"params": [], "weight_decay": key[0], "lr_scale": key[1], "start_step": key[2]})
        groups[key]["params"].append(param)
    return list(groups.values())


def group_lr_multiplier(step: int, group: dict, cfg: TrainConfig) -> float:
    """The schedule's multiplier for one parameter group: 0 before its start step, then scaled."""
    if step + 1 < group["start_step"]:  # ``step`` counts from 0; the group's start counts optimizer steps from 1
        return 0.0
    return group["lr_scale"] * lr_multiplier(step, cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_run_dir(cfg: Config, config_name: str) -> Path:
    name = cfg.train.run_name or f"{config_name}-{datetime.now():%Y%m%d-%H%M%S}"
    return Path(cfg.train.out_dir) / name


def needs_universal(saved: dict, world_size: int, zero_stage: int) -> bool:
    """Whether ZeRO shards saved as ``saved`` describes must be converted to load here.

    Stage-0 checkpoints hold whole optimizer state and load on any number of processes.
    """
    if saved["zero_stage"] == 0 or zero_stage == 0:
        if saved["zero_stage"] != zero_stage:
            raise ConfigError("engine.zero_stage", zero_stage, f"the checkpoint was written with zero_stage="
                              f"{saved['zero_stage']}; resume between stage 0 and ZeRO stages is not supported")
        return False
    return saved["world_size"] != world_size or saved["zero_stage"] != zero_stage


def train(cfg: Config, config_name: str = "run") -> Path:
    """Train as configured; every process of the job calls this. Returns the run directory."""
    from polytrain.platform.engine import Engine

    resume = latest_checkpoint(cfg.train.resume) if cfg.train.resume else None
    universal = resume is not None and needs_universal(read_state(resume), int(os.environ.get("WORLD_SIZE", "1")),
                                                       cfg.engine.zero_stage)
    micro_batch = sum(task.batch_size for task in cfg.data.tasks.values())
    engine = Engine(cfg.engine, micro_batch, cfg.train.grad_accum, cfg.train.grad_clip, load_universal=universal)
    run_dir = Trainer(cfg, engine, config_name, resume, universal).run()
    engine.close()
    return run_dir


class Trainer:
    """One run on one process of the job: its parts are built from the config, then ``run()`` trains."""

    def __init__(self, cfg: Config, engine, config_name: str, resume: Path | None = None, universal: bool = False):
        from polytrain.config import dump_yaml, to_dict  # config.py imports this module

        self.cfg, self.engine = cfg, engine
        run_dir = resume.parent.parent if resume is not None else new_run_dir(cfg, config_name)
        self.run_dir = engine.broadcast(run_dir if engine.is_main else None)
        self.check_global_batch()
        self.config_yaml = dump_yaml(cfg)
        if engine.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.config_yaml)
            log.info("run directory %s (%d process(es), ZeRO stage %d)", self.run_dir, engine.world_size,
                     cfg.engine.zero_stage)
        seed_everything(cfg.train.seed)
        self.prepare_data()
        init_from = cfg.finetune.init_from if resume is None else None  # a resumed run has its own weights
        self.pretrained = read_pretrained(init_from) if init_from else None
        self.tokenizer_file = resume / TOKENIZER if resume is not None else self.text_tokenizer_file()
        self.tokenizers = recipe.build_tokenizers(cfg, self.tokenizer_file)
        self.text = self.tokenizers["text"]
        with engine.main_process_first():  # the main process tokenizes and caches, the others read the cache
            self.train_sets = recipe.build_datasets(cfg, "train", self.tokenizers)
            self.val_sets = recipe.build_datasets(cfg, "val", self.tokenizers)
        self.memory = StateProbe()
        torch.manual_seed(cfg.train.seed)
        model = recipe.build_model(cfg, self.tokenizers)
        n_params = sum(p.numel() for p in model.parameters())
        if self.pretrained is not None:
            self.load_pretrained(model)
        starts = freeze(model, cfg.finetune)
        groups = param_groups(model, cfg.train.weight_decay, cfg.finetune.lr_scale, starts)
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [partial(group_lr_multiplier, group=group,
                                                                          cfg=cfg.train) for group in groups])
        self.model, self.optimizer, self.scheduler = engine.prepare(model, optimizer, scheduler)
        self.memory.attach(base_optimizer(self.optimizer))
        self.weights = {name: task.weight for name, task in cfg.data.tasks.items()}
        self.schedule = Schedule({n: len(ds) for n, ds in self.train_sets.items()},
                                 {n: t.batch_size for n, t in cfg.data.tasks.items()}, cfg.data.mixing, cfg.train.seed)
        # With sampled mixing a rank may get no sample of a task; it then runs that task on a stand-in
        # with zero loss weight, so every rank uses every parameter (ZeRO-3 gathers stay in step).
        self.stand_ins = {n: ds.collate([ds[0]], self.text.pad_id) for n, ds in self.train_sets.items()}
        self.step, self.stream, saved = 0, StreamState(), {}
        if resume is not None:
            saved = self.restore(resume, universal)
        self.tracker = Tracker(cfg.tracking, self.run_dir, to_dict(cfg), cfg.train.steps, engine.is_main,
                               wandb_id=saved.get("wandb_id"), start_step=self.step, config_name=config_name,
                               world_size=engine.world_size, device=engine.device)
        self.samples_log = self.open_samples_log() if cfg.tracking.log_samples else None
        if engine.is_main:
            sizes = ", ".join(f"{n} {len(ds)} train / {len(self.val_sets[n])} val" for n, ds in self.train_sets.items())
            log.info("model: %.2fM parameters; data: %s; vocab %d", n_params / 1e6, sizes, self.text.vocab_size)

    def check_global_batch(self) -> None:
        train, tasks = self.cfg.train, self.cfg.data.tasks
        micro = sum(task.batch_size for task in tasks.values())
        actual = micro * train.grad_accum * self.engine.world_size
        if train.global_batch is not None and train.global_batch != actual:
            parts = " + ".join(f"{name} {task.batch_size}" for name, task in tasks.items())
            raise ConfigError("train.global_batch", train.global_batch,
                              f"!= micro-batch {micro} ({parts}) x train.grad_accum {train.grad_accum} x "
                              f"data-parallel processes {self.engine.world_size} = {actual}")

    def restore(self, folder: Path, universal: bool) -> dict:
        """Load shards, scheduler, data position and RNG from ``folder``; returns its trainer state."""
        saved = read_state(folder)
        shards = folder / "deepspeed"
        if universal:
            with self.engine.main_process_first():  # the main process converts, the others reuse it
                shards = convert_to_universal(folder)
        self.engine.load_shards(self.model, shards)
        self.scheduler.load_state_dict(saved["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the rate the next step uses, per group
        self.step = saved["step"]
        self.stream = StreamState(saved["stream"]["slot"], saved["stream"]["positions"])
        same_world = saved["world_size"] == self.engine.world_size
        if not (same_world and restore_rng(folder / "rng", self.engine.rank)):
            seed_everything(self.cfg.train.seed + 1_000_003 * self.step + self.engine.rank)
        log.info("resumed from %s at step %d (saved by %d process(es)%s)", folder, self.step, saved["world_size"],
                 ", converted to DeepSpeed's universal format" if universal else "")
        return saved

    def run(self) -> Path:
        cfg, engine = self.cfg, self.engine
        slots = self.schedule.slots(self.stream, engine.rank, engine.world_size)
        batches = micro_batches(Mixture(self.train_sets, self.text.pad_id), slots, cfg.data.num_workers)
        self.model.train()
        self.flops = TrainFlops(engine.unwrap(self.model))
        meter = Throughput(engine.world_size, peak_flops(cfg.tracking.peak_tflops, cfg.engine.precision,
                                                         engine.device))
        start = time.perf_counter()
        for step in range(self.step + 1, cfg.train.steps + 1):
            began = time.perf_counter()
            metrics = self.train_step(batches, step)
            meter.add(time.perf_counter() - began, self.samples_per_step, metrics.pop("tokens"), metrics.pop("flops"))
            measured = self.memory.take()
            if measured is not None:  # the first step that stepped the optimizer
                self.log_state_memory(step, measured)
            self.step = step
            rates = meter.rates()
            self.tracker.progress(step, metrics["loss"], rates)
            if step % cfg.tracking.log_every == 0 or step == cfg.train.steps:
                self.tracker.log(step, {**metrics, **rates, **self.memory_metrics()})
                meter.reset()
            if step < cfg.train.steps and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                self.tracker.log(step, flatten_eval(self.evaluate()))
            if step < cfg.train.steps and cfg.train.save_every and step % cfg.train.save_every == 0:
                self.checkpoint(step)
        return self.finish(time.perf_counter() - start)

    def log_state_memory(self, step: int, measured: int) -> None:
        """Tensor memory per rank for parameters, gradients, optimizer states and DeepSpeed's buffers,
        measured at the first optimizer step (compare with ``polytrain plan``)."""
        own = torch.zeros(self.engine.world_size, dtype=torch.float64)
        own[self.engine.rank] = measured / 2**30
        per_rank = self.engine.sum(own)
        self.tracker.log(step, {"memory/states_gib_max": float(per_rank.max()),
                                "memory/states_gib_mean": float(per_rank.mean())})
        if self.engine.is_main:
            log.info("parameters + gradients + optimizer states per rank: %s GiB",
                     " ".join(f"{v:.3f}" for v in per_rank.tolist()))

    def memory_metrics(self) -> dict[str, float]:
        """``meters.memory_gib`` of the rank that uses the most (every rank must call this)."""
        own = memory_gib(self.engine.device)
        table = torch.zeros(self.engine.world_size, len(own), dtype=torch.float64)
        table[self.engine.rank] = torch.tensor(list(own.values()), dtype=torch.float64)
        return dict(zip(own, self.engine.sum(table).max(0).values.tolist()))

    @property
    def samples_per_step(self) -> int:
        return sum(t.batch_size for t in self.cfg.data.tasks.values()) * self.cfg.train.grad_accum * \
            self.engine.world_size

    def train_step(self, batches: Iterator[MicroBatch], step: int) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics, and ``tokens`` and
        ``flops``: the input tokens (``flops.input_tokens``) and model FLOPs (None where a head has no
        count) of the step's samples on all ranks (stand-ins for missing tasks are not counted).

        Each task's loss is normalized by its labelled tokens in the whole step (all micro-batches of
        all ranks), so the gradient does not depend on how the step's samples are split into
        micro-batches and processes.
        """
        accum, world, tasks = self.cfg.train.grad_accum, self.engine.world_size, list(self.weights)
        micro = [next(batches) for _ in range(accum)]
        if self.samples_log is not None:
            for batch in micro:
                self.samples_log.write(json.dumps({"step": step, "slot": batch.slot.index, "samples": {
                    name: part.sample_ids for name, part in batch.tasks.items()}}) + "\n")
        counts = torch.tensor([[labelled(b.tasks[t]) if t in b.tasks else 0 for t in tasks] for b in micro],
                              dtype=torch.float64)
        work = torch.tensor([sum(input_tokens(part) for b in micro for part in b.tasks.values()),
                             sum(self.flops(b.tasks) for b in micro) if self.flops.known else 0], dtype=torch.float64)
        totals = self.engine.sum(counts.sum(0)).clamp(min=1)
        loss_sums = torch.zeros(len(tasks), dtype=torch.float64)
        skipped_before = self.engine.skipped_steps()
        for batch, n in zip(micro, counts):
            parts = {t: batch.tasks.get(t, self.stand_ins[t]).to(self.engine.device) for t in tasks}
            with self.engine.accumulate(self.model):
                losses = self.model(parts)
                factors = n * world * accum / totals  # DeepSpeed divides by accum and averages over ranks
                self.engine.backward(sum(self.weights[t] * losses[t] * float(factors[i]) for i, t in enumerate(tasks)))
            loss_sums += torch.tensor([float(losses[t].detach()) for t in tasks], dtype=torch.float64) * n
        self.optimizer.step()  # under DeepSpeed these two are no-ops: backward() stepped at the boundary
        self.optimizer.zero_grad()
        # The schedule's rate this step used (parameter groups apply their lr_scale and start step to it).
        lr = self.cfg.train.lr * lr_multiplier(self.scheduler.state_dict()["last_epoch"], self.cfg.train)
        skipped = self.engine.skipped_steps() > skipped_before
        if not skipped:  # an fp16 overflow step changed nothing, so the schedule does not advance
            self.scheduler.step()
        self.stream = self.schedule.advance(self.stream, accum * world)
        reduced = self.engine.sum(torch.cat([loss_sums, work]))  # one all-reduce for the losses and the work
        task_losses = dict(zip(tasks, (reduced[:len(tasks)] / totals).tolist()))
        loss = sum(self.weights[t] * v for t, v in task_losses.items())
        if not math.isfinite(loss) and not skipped:
            raise FloatingPointError(f"loss is {loss} at step {step}; per task: {task_losses}")
        return {"loss": loss, **{f"loss/{t}": v for t, v in task_losses.items()}, "lr": lr,
                "grad_norm": self.engine.grad_norm(), "skipped_steps": self.engine.skipped_steps(),
                "target_tokens": int(totals.sum()), "tokens": int(reduced[-2]),
                "flops": float(reduced[-1]) if self.flops.known else None}

    def finish(self, train_seconds: float) -> Path:
        """Final evaluation, checkpoint and eval.json."""
        steps = self.cfg.train.steps
        results = self.evaluate()
        self.tracker.log(steps, {**flatten_eval(results), "train_seconds": train_seconds})
        final = self.checkpoint(steps)
        self.tracker.close()
        if self.samples_log is not None:
            self.samples_log.close()
        if self.engine.is_main:
            (self.run_dir / EVAL_FILE).write_text(json.dumps(results, indent=1) + "\n")
            log.info("trained to step %d in %.1f s; checkpoint %s", steps, train_seconds, final)
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
        state = {"samples_seen": sum(self.stream.positions.values()), "zero_stage": self.cfg.engine.zero_stage,
                 "stream": {"slot": self.stream.slot, "positions": self.stream.positions},
                 "scheduler": self.scheduler.state_dict(), "skipped_steps": self.engine.skipped_steps(),
                 "wandb_id": self.tracker.wandb_id, "replica_sha256": digests}
        return save_checkpoint(self.engine, self.model, self.run_dir, step, self.config_yaml, self.tokenizer_file,
                               state)

    def prepare_data(self) -> None:
        """Resolve every manifest; the main process builds the built-in datasets first."""
        with self.engine.main_process_first():
            for name in self.cfg.data.tasks:
                for split in ("train", "val"):
                    recipe.manifest(self.cfg, name, split)

    def text_tokenizer_file(self) -> Path:
        """The configured tokenizer.json, the pretrained weights' own (their embedding rows are its ids),
        or one trained now on the main process and shared."""
        if self.cfg.tokenizers.text.path:
            return Path(self.cfg.tokenizers.text.path)
        out = self.run_dir / "tokenizer"
        if self.engine.is_main and self.pretrained is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "tokenizer.json").write_text(self.pretrained.tokenizer_json)
        elif self.engine.is_main:
            began = time.perf_counter()
            recipe.train_text_tokenizer(self.cfg, out)
            log.info("trained the text tokenizer in %.1f s", time.perf_counter() - began)
        self.engine.barrier()
        return out / "tokenizer.json"

    def load_pretrained(self, model: torch.nn.Module) -> None:
        """``finetune.init_from``'s weights into ``model``, reporting what was loaded, new and ignored."""
        report = load_initial_weights(model, str(self.pretrained.path), self.pretrained.weights())
        if self.engine.is_main:
            report.write(self.run_dir)
            log.info("%s", report.summary())

    def open_samples_log(self):
        folder = self.run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        return (folder / f"rank{self.engine.rank}.jsonl").open("a", encoding="utf-8")


def labelled(part: TaskBatch) -> int:
    """Positions that carry a loss in ``part``."""
    return int((part.labels != IGNORE_INDEX).sum())


def flatten_eval(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{metric}": value for task, metrics in results.items() for metric, value in metrics.items()}
