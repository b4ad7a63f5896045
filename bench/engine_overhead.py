"""Engine overhead: a training step through polytrain's Engine vs a bare PyTorch loop, side by side.

Same model (two copies of one initialization), same pre-collated micro-batches
(data loading is not timed), same AdamW, clipping and LR; the two loops take
turns in rounds so both see the same machine conditions.  One process.

    python bench/engine_overhead.py [--steps 20] [--rounds 3] [CONFIG] [key=value ...]

Last line: one JSON object with the figures.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from polytrain.job import resolve
from polytrain.platform.data.datasets import build_datasets
from polytrain.platform.data.loader import Mixture
from polytrain.platform.data.order import DataOrder, StreamState
from polytrain.platform.distributed.engine import Engine
from polytrain.platform.train.optimizer import lr_multiplier, param_groups

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    job = resolve(args.config, args.overrides)
    cfg, tokenizers = job.cfg, job.tokenizers
    datasets = build_datasets(cfg, "train", tokenizers, job.manifests)
    schedule = DataOrder({n: len(ds) for n, ds in datasets.items()},
                        {n: t.batch_size for n, t in cfg.data.tasks.items()}, "fixed", cfg.train.seed)
    slots, mixture = schedule.slots(StreamState(), rank=0, world_size=1), Mixture(datasets, tokenizers["text"].pad_id)
    batches = [mixture.build(next(slots)).tasks for _ in range(args.steps + 1)]  # +1 for the untimed warm-up step
    torch.manual_seed(cfg.train.seed)
    model = job.build_model()[0]

    def optimizer_for(m):
        opt = torch.optim.AdamW(param_groups(m, cfg.train.weight_decay), lr=cfg.train.lr, betas=cfg.train.betas)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg.train))

    plain = copy.deepcopy(model)
    plain_opt, plain_sched = optimizer_for(plain)

    def plain_step(batch):
        loss = sum(plain(batch).values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)
        plain_opt.step()
        plain_opt.zero_grad()
        plain_sched.step()
        return float(loss)

    samples = sum(t.batch_size for t in cfg.data.tasks.values())
    engine = Engine(cfg.engine, samples, 1, cfg.train.grad_clip)
    engine_model = copy.deepcopy(model)
    wrapped, opt, sched = engine.prepare(engine_model, *optimizer_for(engine_model))

    def engine_step(batch):
        with engine.accumulate(wrapped):
            loss = sum(wrapped(batch).values())
            engine.backward(loss)
        opt.step()
        opt.zero_grad()
        sched.step()
        return float(loss)

    first = plain_step(batches[0]), engine_step(batches[0])
    times = {"plain": [], "engine": []}
    for _ in range(args.rounds):
        for name, step in (("plain", plain_step), ("engine", engine_step)):
            began = time.perf_counter()
            for batch in batches[1:]:
                step(batch)
            times[name].append((time.perf_counter() - began) / args.steps)
    engine.close()

    plain_s, engine_s = statistics.median(times["plain"]), statistics.median(times["engine"])
    print(f"micro-batch: {samples} samples; {args.rounds} rounds x {args.steps} steps each; ZeRO stage "
          f"{cfg.engine.zero_stage}, {cfg.engine.precision}, {torch.get_num_threads()} threads")
    print(f"first-step loss   plain {first[0]:.6f}   engine {first[1]:.6f}")
    print(f"step time (median) plain {plain_s * 1e3:.1f} ms   engine {engine_s * 1e3:.1f} ms")
    print(f"engine / plain step time: {engine_s / plain_s:.3f}")
    print(json.dumps({"bench": "engine_overhead", "plain_step_ms": round(plain_s * 1e3, 2),
                      "engine_step_ms": round(engine_s * 1e3, 2), "engine_over_plain": round(engine_s / plain_s, 3),
                      "engine_samples_per_s": round(samples / engine_s, 1),
                      "first_loss_abs_diff": abs(first[0] - first[1]), "zero_stage": cfg.engine.zero_stage}))


if __name__ == "__main__":
    sys.exit(main())
