"""ZeRO memory: per-rank model + optimizer memory and step time under stages 0-3, side by side.

Each stage trains the same recipe for a few steps with N local processes (gloo on CPU, NCCL on
GPUs).  The trainer logs what building the model and taking the first step added to each rank's
memory (``memory/states_gib_max``: resident memory on CPU, allocated memory on a GPU) and the step
time; next to it the figure ``polytrain plan`` estimates for the same run.

    python bench/zero_memory.py [--procs 2] [--steps 6] [--config CONFIG] [key=value ...]

Last line: one JSON object with the figures.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from polytrain.job import resolve
from polytrain.platform.distributed.memory_planner import Option, activation_bytes, estimate
from polytrain.platform.observe.meters import GIB

REPO = Path(__file__).resolve().parent.parent
MODEL = ["model.backbone.dim=512", "model.backbone.n_heads=8", "model.backbone.encoder_layers=4",
         "model.backbone.decoder_layers=4", "model.backbone.mlp_ratio=4.0", "engine.bucket_size=2000000"]
"""About 30M parameters on the tiny recipe: large enough that the states dwarf the allocator's noise."""


def run_stage(config: str, overrides: list[str], stage: int, procs: int, steps: int, out: Path) -> dict:
    """Train one stage; returns its run's metrics: first-step memory and the mean time of the later steps."""
    name = f"zero{stage}"
    cmd = [sys.executable, "-m", "polytrain.cli", "launch", config, *overrides, f"engine.zero_stage={stage}",
           f"launch.procs_per_node={procs}", f"train.steps={steps}", "train.warmup_steps=1",
           "tracking.log_every=1", "tracking.progress_bar=false", f"train.out_dir={out}", f"train.run_name={name}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"stage {stage} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    memory = next(r["memory/states_gib_max"] for r in rows if "memory/states_gib_max" in r)
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 1]
    return {"measured_gib": memory, "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    overrides = MODEL + args.overrides
    job = resolve(args.config, overrides)
    cfg = job.cfg
    n_params, n_trainable = job.parameter_counts()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            row = run_stage(args.config, overrides, stage, args.procs, args.steps, Path(tmp))
            planned = estimate(cfg, Option(stage), args.procs, n_params, n_trainable, activation_bytes(cfg, job.grids()))
            row["estimated_gib"] = planned.states / GIB
            results[stage] = row
            print(f"ZeRO-{stage}: measured {row['measured_gib']:.3f} GiB/rank, plan {row['estimated_gib']:.3f} "
                  f"GiB/rank, step {row['step_s'] * 1000:.0f} ms", flush=True)
    figures = {"params_m": round(n_params / 1e6, 2), "procs": args.procs, "precision": cfg.engine.precision,
               "stages": {f"zero{s}": {k: round(v, 4) for k, v in r.items()} for s, r in results.items()}}
    if 0 in results:
        for stage, row in results.items():
            figures["stages"][f"zero{stage}"]["vs_zero0"] = round(row["measured_gib"] / results[0]["measured_gib"], 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
