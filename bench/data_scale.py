"""Start-up and memory against the size of the data: the quick start trained on 1x, 10x and 100x its data
(the embedded sets repeated), read from manifests and from prepared splits, side by side.

    python bench/data_scale.py [--scales 1 10 100] [--steps 10]

Each run is ``polytrain train`` in a fresh process (one rank) with the same tokenizer; measured are the
seconds from the process's start to its first step and the rank's resident memory at its last step
(``memory/rss_gib``), and for prepared data the prepare step's time and the split's size on disk.
Last line: one JSON object with the figures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from polytrain.job import resolve
from polytrain.platform.data.builtin import resolve_manifest
from polytrain.platform.data.prepare import prepare_tasks
from polytrain.platform.data.vocabulary import trained_tokenizer

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"
TASKS = ("image_to_text", "audio_to_text", "text_lm")


def scaled_manifests(cfg, folder: Path, scale: int) -> list[str]:
    """Each task's training manifest repeated ``scale`` times (file paths made absolute, ids made unique) and
    its held-out manifest once, under ``folder``; returns the overrides naming them."""
    folder.mkdir(parents=True)
    overrides = []
    for task in TASKS:
        for split, times in (("train", scale), ("val", 1)):
            source = resolve_manifest(getattr(cfg.data.tasks[task], split), cfg.data.cache_dir)
            lines = [json.loads(line) for line in source.read_text().splitlines()]
            for line in lines:
                for key in ("image", "audio"):
                    if key in line:
                        line[key] = str((source.parent / line[key]).resolve())
            out = folder / f"{task}-{split}.jsonl"
            with out.open("w") as manifest:
                for copy in range(times):
                    for line in lines:
                        manifest.write(json.dumps({**line, "id": f"{line['id']}#{copy}"}) + "\n")
            overrides.append(f"data.tasks.{task}.{split}={out}")
    return overrides


def train(run: Path, overrides: list[str], steps: int) -> dict:
    """One ``polytrain train`` run: seconds to its first step, resident memory at its last."""
    args = [sys.executable, "-m", "polytrain.cli", "train", str(QUICKSTART), f"train.steps={steps}",
            f"train.out_dir={run.parent}", f"train.run_name={run.name}", "tracking.log_every=1", "train.eval_every=0",
            *(f"data.tasks.{t}.max_val_samples=16" for t in TASKS), *overrides]
    began = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        raise SystemExit(f"run {run.name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [r for r in rows if "loss" in r]
    return {"first_step_s": round(steps_logged[0]["time"] - began, 1),
            "rss_gib": round(steps_logged[-1]["memory/rss_gib"], 3)}


def du(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0, help="prepare's worker processes (0: one per CPU)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = f"data.cache_dir={tmp / 'cache'}"
        job = resolve(QUICKSTART, [cache])
        cfg = job.cfg
        tokenizer = f"tokenizers.text.path={trained_tokenizer(cfg, job.manifests)}"
        for scale in args.scales:
            manifests = scaled_manifests(cfg, tmp / f"x{scale}", scale)
            scaled = resolve(QUICKSTART, [cache, tokenizer, *manifests])
            began = time.perf_counter()
            prepared = prepare_tasks(scaled.cfg, scaled.manifests, scaled.tokenizers["text"],
                                     tmp / f"x{scale}-prepared", args.workers, 1000)
            prepare_s = time.perf_counter() - began
            row = {"records": sum(1 for m in manifests for _ in open(m.split("=", 1)[1]) if "-train" in m),
                   "prepare_s": round(prepare_s, 1), "prepared_mib": round(du(tmp / f"x{scale}-prepared"), 1),
                   "prepared": train(tmp / "runs" / f"prepared-x{scale}", [cache, tokenizer, *prepared], args.steps),
                   # a cache of its own per run: the manifest run tokenizes its corpus, as a first run does
                   "manifests": train(tmp / "runs" / f"manifests-x{scale}",
                                      [f"data.cache_dir={tmp / f'cache-x{scale}'}", tokenizer, *manifests],
                                      args.steps)}
            results[scale] = row
            print(f"x{scale}: {json.dumps(row)}", flush=True)
    first, last = results[args.scales[0]], results[args.scales[-1]]
    print(f"\n{'scale':>6} {'records':>9} {'prepare s':>10} {'MiB':>8}   {'first step s':>12} {'RSS GiB':>8}   "
          f"{'first step s':>12} {'RSS GiB':>8}")
    print(f"{'':>36}   {'prepared':^21}   {'manifests':^21}")
    for scale, row in results.items():
        print(f"{scale:>5}x {row['records']:>9} {row['prepare_s']:>10} {row['prepared_mib']:>8}   "
              f"{row['prepared']['first_step_s']:>12} {row['prepared']['rss_gib']:>8}   "
              f"{row['manifests']['first_step_s']:>12} {row['manifests']['rss_gib']:>8}")
    ratios = {mode: {key: round(last[mode][key] / first[mode][key], 3) for key in ("first_step_s", "rss_gib")}
              for mode in ("prepared", "manifests")}
    print(f"{args.scales[-1]}x over {args.scales[0]}x: " + "; ".join(
        f"{mode} first step {r['first_step_s']}, RSS {r['rss_gib']}" for mode, r in ratios.items()))
    print(json.dumps({"bench": "data_scale", "load_average": os.getloadavg()[0],
                      "scales": {str(k): v for k, v in results.items()}, "ratios_last_over_first": ratios}))


if __name__ == "__main__":
    sys.exit(main())
