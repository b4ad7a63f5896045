"""The training loop: a job's parts assembled, then steps, logging, evaluation, checkpoints, resume."""

import json
import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from polytrain import atomic
from polytrain.errors import ConfigError, DivergenceError, Stopped
from polytrain.models.flops import TrainFlops
from polytrain.platform.data.balance import cost_model
from polytrain.platform.data.datasets import build_datasets
from polytrain.platform.data.loader import Mixture, micro_batches
from polytrain.platform.data.order import Budget, DataOrder
from polytrain.platform.distributed.checkpoint import (
    CheckpointWriteError,
    convert_to_universal,
    read_state,
    restore_rng,
    save_checkpoint,
)
from polytrain.platform.distributed.engine import Engine, base_optimizer
from polytrain.platform.distributed.stand_ins import StandIns
from polytrain.platform.observe.meters import StateProbe, Throughput, memory_gib, peak_flops
from polytrain.platform.observe.run_dir import CheckpointDir, RunDir, new_run_name
from polytrain.platform.observe.tracking import Tracker, keep_until
from polytrain.platform.train.evaluate import evaluate, format_table
from polytrain.platform.train.finetune import describe, freeze
from polytrain.platform.train.init_from import load_initial_weights
from polytrain.platform.train.optimizer import group_lr_multiplier, param_groups
from polytrain.platform.train.sources import offers
from polytrain.platform.train.state import (
    Progress,
    SchedulerState,
    TrackingState,
    TrainerState,
    seed_everything,
)
from polytrain.platform.train.step import Stepper
from polytrain.platform.train.stopping import StopSignals, leave_stop_file, tell_launcher
from polytrain.schema import to_dict

log = logging.getLogger(__name__)


def train(job) -> Path:
    """Train the job (a ``polytrain.job.Job``); every process of it calls this. Returns the run directory.

    What can be checked before any process group exists is checked first, so a mistake is one line from
    every process and never a collective left waiting.
    """
    job.check_machine()
    cfg, resume = job.cfg, job.resume
    universal = resume is not None and needs_universal(read_state(resume.state), job.processes, cfg.engine.zero_stage)
    stops = StopSignals()
    try:
        micro_batch = sum(task.batch_size for task in cfg.data.tasks.values())  # DeepSpeed's bookkeeping
        engine = Engine(cfg.engine, micro_batch, cfg.train.grad_accum, cfg.train.grad_clip,
                        load_universal=universal)
        trainer = Trainer(job, engine, stops, universal)
        run_dir = trainer.run()
    finally:
        stops.restore()
    engine.close()
    if trainer.stopped:
        raise Stopped(trainer.stopped)
    return run_dir.path


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


class Trainer:
    """One run on one process of the job: ``__init__`` assembles what the job hands it, going down the layers once
    (run directory, data, model, engine, loop), then ``run()`` trains."""

    def __init__(self, job, engine: Engine, stops: StopSignals, universal: bool = False):
        cfg = job.cfg
        self.cfg, self.engine, self.stops = cfg, engine, stops
        self.stopped: str | None = None
        """Why the run stopped early, with the checkpoint it wrote (after a stop signal)."""
        # The run directory: the main process names it (a timestamp), every rank uses that name.
        run_dir = job.resume.run if job.resume is not None else \
            RunDir(Path(cfg.train.out_dir) / (cfg.train.run_name or new_run_name(job.name)))
        self.run_dir: RunDir = engine.broadcast(run_dir if engine.is_main else None)
        tree = to_dict(cfg)
        self.config_yaml = yaml.safe_dump(tree, sort_keys=False)
        if engine.is_main:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.run_dir.config, self.config_yaml)
            log.info("run directory %s (%d process(es), ZeRO stage %d)", self.run_dir.path, engine.world_size,
                     cfg.engine.zero_stage)
        seed_everything(cfg.train.seed)
        # Data: the main process builds the built-in datasets and trains the text tokenizer, the others reuse them.
        with engine.main_process_first():
            self.tokenizers = job.tokenizers
            self.train_sets = build_datasets(cfg, "train", self.tokenizers, job.manifests)
            self.val_sets = build_datasets(cfg, "val", self.tokenizers, job.manifests)
        self.text = self.tokenizers["text"]
        self.tokenizer_file = self.run_dir.tokenizer
        if engine.is_main:
            self.tokenizer_file.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.tokenizer_file, job.tokenizer_json)
        # The model: initialized, pretrained weights loaded (a resumed run has its own), frozen where configured;
        # then the optimizer over what trains, and the engine (the memory probe's baseline is taken first).
        self.memory = StateProbe()
        torch.manual_seed(cfg.train.seed)
        model, adapted = job.build_model()
        if job.sources and job.resume is None:
            self.load_pretrained(model, job.sources)
        starts, frozen = freeze(model, cfg.finetune)
        if engine.is_main and (adapted or frozen or starts):
            log.info("%s", describe(cfg.finetune, adapted, starts, frozen, len(model.state_dict())))
        counts = (sum(p.numel() for p in model.parameters()),
                  sum(p.numel() for p in model.parameters() if p.requires_grad))
        groups = param_groups(model, cfg.train.weight_decay, cfg.finetune.lr_scale, starts)
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [partial(group_lr_multiplier, group=group,
                                                                          cfg=cfg.train) for group in groups])
        self.model, self.optimizer, self.scheduler = engine.prepare(model, optimizer, scheduler)
        self.memory.attach(base_optimizer(self.optimizer))
        # The loop: the data order, what a step runs, the resumable state (loaded when resuming, after the engine
        # has the shards), tracking (continuing the resumed W&B run).
        self.order = DataOrder({n: len(ds) for n, ds in self.train_sets.items()},
                               {n: t.batch_size for n, t in cfg.data.tasks.items() if not t.budget}, cfg.data.mixing,
                               cfg.train.seed, self.budgets(), cfg.train.grad_accum * engine.world_size)
        stand_ins = StandIns(engine.unwrap(self.model),
                             {n: ds.collate([ds[0]], torch.Generator().manual_seed(0)) for n, ds in self.train_sets.items()},
                             {n: task.modalities for n, task in cfg.data.tasks.items()})
        self.stepper = Stepper(engine, self.model, self.optimizer, self.scheduler, cfg.train,
                               {name: task.weight for name, task in cfg.data.tasks.items()}, stand_ins,
                               TrainFlops(engine.unwrap(self.model)))
        self.progress, self.tracking = Progress(), TrackingState()
        self.state = TrainerState(progress=self.progress, scheduler=SchedulerState(self.scheduler, self.optimizer),
                                  tracking=self.tracking)
        if job.resume is not None:
            self.restore(job.resume, universal)
        self.tracker = Tracker(cfg.tracking, self.run_dir, tree, cfg.train.steps, engine.is_main,
                               wandb_id=self.tracking.wandb_id, start_step=self.progress.step,
                               config_name=job.name, world_size=engine.world_size, device=engine.device)
        self.tracking.wandb_id = self.tracker.wandb_id
        self.bad_steps: list[tuple[int, list[str]]] = []
        """The bad steps in a row up to now: (step, what was not finite)."""
        self.samples_log = self.open_samples_log() if cfg.tracking.log_samples else None
        if engine.is_main:
            sizes = ", ".join(f"{n} {len(ds)} train / {len(self.val_sets[n])} val" for n, ds in self.train_sets.items())
            log.info("%s; data: %s", job.summary(counts), sizes)

    def budgets(self) -> dict[str, Budget]:
        """The budgeted tasks' step costs (the budget is per process and micro-batch) and sample lengths."""
        budgets = {}
        for name, task in self.cfg.data.tasks.items():
            if task.budget:
                lengths = self.train_sets[name].lengths
                lengths(0)  # a dataset that cannot size its samples without decoding them is refused now
                budgets[name] = Budget(task.budget * self.cfg.train.grad_accum * self.engine.world_size,
                                       task.bucket_steps, cost_model(task.budget_cost, self.cfg.model.backbone.dim),
                                       lengths)
        return budgets

    def restore(self, folder: CheckpointDir, universal: bool) -> None:
        """Load shards, the resumable state and the RNG from ``folder``."""
        saved = read_state(folder.state)
        shards = folder.shards
        if universal:
            with self.engine.main_process_first():  # the main process converts, the others reuse it
                shards = convert_to_universal(folder)
        self.engine.load_shards(self.model, shards)
        self.state.load_state_dict(saved)
        same_world = saved["world_size"] == self.engine.world_size
        if not (same_world and restore_rng(folder.rng, self.engine.rank)):
            seed_everything(self.cfg.train.seed + 1_000_003 * self.progress.step + self.engine.rank)
        log.info("resumed from %s at step %d (saved by %d process(es)%s)", folder.path, self.progress.step,
                 saved["world_size"], ", converted to DeepSpeed's universal format" if universal else "")

    def run(self) -> RunDir:
        cfg, engine = self.cfg, self.engine
        slots = self.order.slots(self.progress.stream, engine.rank, engine.world_size)
        batches = micro_batches(Mixture(self.train_sets, cfg.train.seed), slots, cfg.data.num_workers,
                                cfg.data.prefetch, pin_memory=engine.device.type == "cuda")
        self.model.train()
        meter = Throughput(engine.world_size, peak_flops(cfg.tracking.peak_tflops, cfg.engine.precision,
                                                         engine.device))
        start = time.perf_counter()
        for step in range(self.progress.step + 1, cfg.train.steps + 1):
            began = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.train.grad_accum)]
            self.log_samples(micro, step)
            result = self.stepper(micro, step, stop=self.stops.received is not None)
            meter.add(time.perf_counter() - began, result.samples, result.tokens, result.flops)
            measured = self.memory.take()
            if measured is not None:  # the first step that stepped the optimizer
                self.log_state_memory(step, measured)
            self.progress.step = step
            self.progress.stream = self.order.advance(self.progress.stream, cfg.train.grad_accum * engine.world_size)
            rates = meter.rates()
            self.tracker.progress(step, result.metrics["loss"], rates)
            if step % cfg.tracking.log_every == 0 or step == cfg.train.steps:
                self.tracker.log(step, {**result.metrics, **rates, **self.memory_metrics()})
                meter.reset()
            self.count_bad_steps(step, result)
            if result.stop:
                self.stopped = self.stop_early(step)
                return self.run_dir
            if step < cfg.train.steps and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                self.tracker.log(step, flatten_eval(self.evaluate(step)))
            if step < cfg.train.steps and cfg.train.save_every and step % cfg.train.save_every == 0:
                if self.bad_steps:  # the model gives non-finite losses: nothing to resume from
                    log.warning("step %d: no checkpoint while steps are bad (%d in a row)", step, len(self.bad_steps))
                else:
                    self.checkpoint(step, final=False)
        return self.finish(time.perf_counter() - start)

    def count_bad_steps(self, step: int, result) -> None:
        """A bad step (its loss or gradient norm not finite; skipped) extends the run of them, an applied step
        ends it; ``train.max_bad_steps`` in a row stop the run."""
        if not result.nonfinite:
            if not result.skipped:
                self.bad_steps = []
            return
        self.bad_steps.append((step, result.nonfinite))
        limit = self.cfg.train.max_bad_steps
        if self.engine.is_main:
            log.warning("step %d skipped: not finite: %s (%d bad step(s) in a row; train.max_bad_steps=%d)", step,
                        ", ".join(result.nonfinite), len(self.bad_steps), limit)
        if len(self.bad_steps) >= limit:
            names = {name for _, names in self.bad_steps for name in names}
            tasks = sorted(names - {"grad_norm"})
            what = " or ".join([f"loss ({', '.join(tasks)})"] * bool(tasks) + ["gradient norm"] * ("grad_norm" in names))
            raise DivergenceError(f"training diverged: {limit} steps in a row ({self.bad_steps[0][0]}-{step}, "
                                  f"train.max_bad_steps={limit}) had a non-finite {what}; {self.last_checkpoint()}; "
                                  f"try a lower train.lr, and look at the samples the log names")

    def last_checkpoint(self) -> str:
        """Where the run can go on from: its latest checkpoint (no checkpoint is written over non-finite weights)."""
        latest = self.run_dir.latest
        if not latest.is_file():
            return "no checkpoint was written"
        return f"the last checkpoint (finite weights) is {self.run_dir.checkpoints / latest.read_text().strip()}"

    def stop_early(self, step: int) -> str:
        """Every rank stops after ``step``: a checkpoint (unless the steps are bad), the logs closed; returns what
        happened, for the one line the job ends with."""
        tell_launcher()
        saved = ("no checkpoint, the last steps being bad; " + self.last_checkpoint() if self.bad_steps else
                 f"checkpoint {self.checkpoint(step).path}")
        self.close_logs()
        got = self.stops.received.name if self.stops.received else "another process's stop signal"
        message = (f"stopped by {got} after step {step}: {saved}; continue with train.resume={self.run_dir.path} "
                   f"(a requeued or restarted job does so by itself)")
        if self.engine.is_main:
            leave_stop_file(message)
        return message

    def log_samples(self, micro: list, step: int) -> None:
        if self.samples_log is None:
            return
        for batch in micro:
            self.samples_log.write(json.dumps({"step": step, "slot": batch.slot.index, "samples": {
                name: part.sample_ids for name, part in batch.tasks.items()}}) + "\n")
        self.samples_log.flush()  # a process killed later still leaves every step it trained

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

    def finish(self, train_seconds: float) -> RunDir:
        """Final evaluation, checkpoint and eval.json."""
        steps = self.cfg.train.steps
        results = self.evaluate(steps)
        self.tracker.log(steps, {**flatten_eval(results), "train_seconds": train_seconds})
        final = self.checkpoint(steps)
        self.close_logs()
        if self.engine.is_main:
            atomic.write_text(self.run_dir.eval, json.dumps(results, indent=1) + "\n")
            log.info("trained to step %d in %.1f s; checkpoint %s", steps, train_seconds, final.path)
            print(format_table(results), flush=True)
            print(f"run directory: {self.run_dir.path}", flush=True)
        return self.run_dir

    def close_logs(self) -> None:
        self.tracker.close()
        if self.samples_log is not None:
            self.samples_log.close()

    def evaluate(self, step: int) -> dict[str, dict[str, float]]:
        """The held-out metrics; one that is not finite fails the run."""
        try:
            results = evaluate(self.engine.unwrap(self.model), self.cfg.data.tasks, self.val_sets, self.text,
                               self.engine.device, self.cfg.train.eval_batch_size, self.cfg.model.heads.decoding)
        except OverflowError as err:  # math.exp of a loss past 709 (the perplexity)
            raise DivergenceError(f"the evaluation at step {step} overflowed ({err}: a perplexity e**val_loss past any "
                                  f"float); {self.last_checkpoint()}") from None
        bad = [f"{task}.{name}={value}" for task, metrics in results.items() for name, value in metrics.items()
               if not math.isfinite(value)]
        if bad:
            raise DivergenceError(f"the evaluation at step {step} is not finite: {', '.join(bad)}; the run failed "
                                  f"and writes no checkpoint; {self.last_checkpoint()}")
        return results

    def checkpoint(self, step: int, final: bool = True) -> CheckpointDir | None:
        """Save the run at ``step``. A save that cannot be written stops the run, or, for one that is not
        ``final`` with ``train.failed_save=continue``, is logged and returns None."""
        digests, nonfinite = self.engine.replica_digests(self.model)
        if len(set(digests)) > 1:
            raise RuntimeError(f"model replicas diverged by step {step}: parameter digests per rank {digests}")
        if nonfinite:
            raise DivergenceError(f"the weights are not finite at step {step} ({len(nonfinite)} tensor(s), e.g. "
                                  f"{', '.join(nonfinite[:3])}); no checkpoint is written over them; "
                                  f"{self.last_checkpoint()}")
        state: dict[str, Any] = {**self.state.state_dict(), "zero_stage": self.cfg.engine.zero_stage,
                                 "skipped_steps": self.engine.skipped_steps(), "replica_sha256": digests}
        try:
            return save_checkpoint(self.engine, self.model, self.run_dir, step, self.config_yaml, self.tokenizer_file,
                                   state)
        except CheckpointWriteError as err:
            if final or self.cfg.train.failed_save == "stop":
                raise
            if self.engine.is_main:
                log.warning("step %d: %s; training goes on (train.failed_save=continue)", step, err)
            return None

    def load_pretrained(self, model: torch.nn.Module, sources: list) -> None:
        """The checkpoints' weights into ``model``, reporting what was loaded, new and ignored."""
        report = load_initial_weights(model, offers(sources, set(model.state_dict()), self.cfg.data.heads))
        if self.engine.is_main:
            report.write(self.run_dir)
            log.info("%s", report.summary())

    def open_samples_log(self):
        """This rank's sample log, without the lines an interrupted attempt wrote after the step resumed from."""
        path = self.run_dir.samples(self.engine.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        keep_until(path, self.progress.step)
        return path.open("a", encoding="utf-8")


def flatten_eval(results: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{task}/{metric}": value for task, metrics in results.items() for metric, value in metrics.items()}
