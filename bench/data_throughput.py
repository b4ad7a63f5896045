"""Loader throughput beside the step it feeds: samples/s the loader delivers (0, 1, 2 workers) and samples/s a
training step consumes, side by side, for the quick start (its manifests, and prepared) and for a task of a
realistic shape (224 px JPEG images and 10 s 16 kHz clips -> text, prepared).

    python bench/data_throughput.py [--batches 24] [--steps 6] [--workers 0 1 2]

The loader is timed alone (what it can deliver); the step is forward + backward + AdamW on micro-batches
loaded beforehand (what it consumes). Last line: one JSON object with the figures.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image, ImageFilter

from polytrain.job import resolve
from polytrain.platform.data.datasets import build_datasets
from polytrain.platform.data.loader import Mixture, micro_batches
from polytrain.platform.data.order import DataOrder, StreamState
from polytrain.platform.data.prepare import prepare_tasks
from polytrain.platform.train.optimizer import param_groups

REPO = Path(__file__).resolve().parent.parent
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
REALISTIC = """
model:
  backbone: {dim: 192, n_heads: 6, encoder_layers: 3, decoder_layers: 3, mlp_ratio: 4.0}
tokenizers:
  text: {vocab_size: 512, max_len: 64}
  image: {size: 224, patch_size: 16, channels: 3}
  audio: {n_mels: 80, patch_mels: 16, patch_frames: 16, max_seconds: 10.0}
data:
  tasks:
    photo_to_text: {head: encoder_decoder, source: image, train: FOLDER/photos.jsonl, val: FOLDER/photos.jsonl,
                    batch_size: 8}
    speech_to_text: {head: encoder_decoder, source: audio, train: FOLDER/speech.jsonl, val: FOLDER/speech.jsonl,
                     batch_size: 4}
"""


def realistic_files(folder: Path, n_images: int, n_clips: int) -> Path:
    """224 x 224 JPEGs (smoothed noise, quality 90) and 10 s 16 kHz clips (tones in noise), a word each."""
    rng = np.random.default_rng(0)
    with (folder / "photos.jsonl").open("w") as lines:
        for i in range(n_images):
            pixels = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
            pixels.filter(ImageFilter.GaussianBlur(3)).save(folder / f"{i}.jpg", quality=90)
            lines.write(json.dumps({"image": f"{i}.jpg", "target": WORDS[i % 10]}) + "\n")
    seconds = np.arange(160_000) / 16_000
    with (folder / "speech.jsonl").open("w") as lines:
        for i in range(n_clips):
            wave = 0.3 * np.sin(2 * np.pi * (200 + 40 * i) * seconds) + rng.normal(0, 0.05, seconds.shape)
            soundfile.write(folder / f"{i}.wav", wave.astype(np.float32), 16_000)
            lines.write(json.dumps({"audio": f"{i}.wav", "target": WORDS[i % 10]}) + "\n")
    recipe_file = folder / "realistic.yaml"
    recipe_file.write_text(REALISTIC.replace("FOLDER", str(folder)))
    return recipe_file


def prepared_job(config: Path, out: Path, overrides: list[str]):
    """The recipe pointed at its data prepared under ``out``."""
    job = resolve(config, overrides)
    return resolve(config, [*overrides, *prepare_tasks(job.cfg, job.manifests, job.tokenizers["text"], out, 0, 1000)])


def parts(job):
    cfg, tokenizers = job.cfg, job.tokenizers
    datasets = build_datasets(cfg, "train", tokenizers, job.manifests)
    order = DataOrder({n: len(ds) for n, ds in datasets.items()},
                      {n: t.batch_size for n, t in cfg.data.tasks.items()}, "fixed", cfg.train.seed)
    return tokenizers, datasets, order


def loader_rate(datasets, order, cfg, workers: int, n: int) -> float:
    """Samples/s ``workers`` loader processes deliver (after the first batch, which waits for them to start)."""
    batches = micro_batches(Mixture(datasets, cfg.train.seed), order.slots(StreamState(), 0, 1), workers)
    next(batches)
    began = time.perf_counter()
    samples = sum(len(part.sample_ids) for _ in range(n) for part in next(batches).tasks.values())
    return samples / (time.perf_counter() - began)


def step_rate(job, datasets, order, steps: int) -> float:
    """Samples/s of forward + backward + AdamW on micro-batches loaded beforehand."""
    cfg = job.cfg
    mixture, slots = Mixture(datasets, cfg.train.seed), order.slots(StreamState(), 0, 1)
    batches = [mixture.build(next(slots)).tasks for _ in range(steps + 1)]
    torch.manual_seed(cfg.train.seed)
    model = job.build_model()[0]
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr)

    def step(batch):
        sum(model(batch).values()).backward()
        optimizer.step()
        optimizer.zero_grad()

    step(batches[0])
    began = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    return sum(len(p.sample_ids) for b in batches[1:] for p in b.values()) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=24, help="micro-batches timed per loader setting")
    parser.add_argument("--steps", type=int, default=6, help="training steps timed")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--clips", type=int, default=64)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        quickstart, cache = REPO / "configs" / "quickstart.yaml", [f"data.cache_dir={tmp / 'cache'}"]
        (tmp / "realistic").mkdir()
        cases = {
            "quickstart (manifests)": lambda: resolve(quickstart, cache),
            "quickstart (prepared)": lambda: prepared_job(quickstart, tmp / "qs", cache),
            "224px JPEG + 10 s audio (prepared)": lambda: prepared_job(
                realistic_files(tmp / "realistic", args.images, args.clips), tmp / "real", []),
        }
        for name, make in cases.items():
            job = make()
            cfg = job.cfg
            tokenizers, datasets, order = parts(job)
            step = step_rate(job, datasets, order, args.steps)
            loads = {w: loader_rate(datasets, order, cfg, w, args.batches) for w in args.workers}
            rows[name] = {"step_samples_per_s": round(step, 1),
                          **{f"loader_w{w}_samples_per_s": round(rate, 1) for w, rate in loads.items()},
                          "best_loader_over_step": round(max(loads.values()) / step, 2)}
            print(f"{name}: step {step:.1f} samples/s; loader " +
                  ", ".join(f"{w} worker(s) {r:.1f}" for w, r in loads.items()), flush=True)
    width = max(len(name) for name in rows)
    header = f"{'case'.ljust(width)}  {'step':>8}  " + "  ".join(f"{f'loader w={w}':>12}" for w in args.workers)
    print(f"\nsamples/s on {torch.get_num_threads()} threads\n{header}  {'loader/step':>11}")
    for name, row in rows.items():
        print(f"{name.ljust(width)}  {row['step_samples_per_s']:>8.1f}  " +
              "  ".join(f"{row[f'loader_w{w}_samples_per_s']:>12.1f}" for w in args.workers) +
              f"  {row['best_loader_over_step']:>11.2f}")
    print(json.dumps({"bench": "data_throughput", "threads": torch.get_num_threads(), "cases": rows}))


if __name__ == "__main__":
    sys.exit(main())
