"""Padding and rank balance on skewed lengths, a fixed count of samples per micro-batch beside a cost budget.

    python bench/data_balance.py [--steps 24] [--ranks 4] [--accum 2]

The data: spoken clips, 70% of 1-2 s and 30% of 8-10 s, and images of mixed sizes (64 to 224 px a side, read at
their own aspect ratio, ``resize: fit``), each -> a word or two; prepared, then dealt by the data order to
``ranks`` x ``accum`` micro-batches per step and collated as training collates them.  Measured from the
batches themselves: the share of padding among all slots, and the most loaded rank's padded cost over the
mean (per step; worst and mean over the steps), counting tokens and counting attention's quadratic term.
Last line: one JSON object with the figures.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from polytrain.job import resolve
from polytrain.platform.data.balance import cost_model
from polytrain.platform.data.datasets import build_datasets
from polytrain.platform.data.loader import Mixture
from polytrain.platform.data.order import Budget, DataOrder, StreamState
from polytrain.platform.data.prepare import prepare_tasks

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RECIPE = """
model:
  backbone: {dim: 192, n_heads: 6, encoder_layers: 3, decoder_layers: 3}
tokenizers:
  text: {vocab_size: 400, max_len: 64}
  image: {size: 224, patch_size: 16, channels: 3, resize: fit}
  audio: {n_mels: 80, patch_mels: 16, patch_frames: 16, max_seconds: 10.0}
data:
  tasks:
    speech: {head: encoder_decoder, source: audio, train: FOLDER/speech.jsonl, val: FOLDER/speech.jsonl}
    photos: {head: encoder_decoder, source: image, train: FOLDER/photos.jsonl, val: FOLDER/photos.jsonl}
"""
BUDGET = {"speech": 1600, "photos": 800}
"""Tokens per micro-batch and rank (encoder patches and decoder text); the attention budget is the cost that
holds as many samples on average (this budget times the data's mean attention cost over its mean tokens)."""


def skewed_files(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    with (folder / "speech.jsonl").open("w") as lines:
        for i in range(n):
            seconds = rng.uniform(8, 10) if rng.random() < 0.3 else rng.uniform(1, 2)
            t = np.arange(int(seconds * 16_000)) / 16_000
            soundfile.write(folder / f"{i}.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16_000)
            words = " ".join(WORDS[k] for k in rng.integers(0, 10, rng.integers(1, 3)))
            lines.write(json.dumps({"audio": f"{i}.wav", "target": words}) + "\n")
    with (folder / "photos.jsonl").open("w") as lines:
        for i in range(n):
            height, width = (int(16 * rng.integers(4, 15)) for _ in range(2))
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            lines.write(json.dumps({"image": f"{i}.png", "target": WORDS[i % 10]}) + "\n")
    (folder / "skewed.yaml").write_text(RECIPE.replace("FOLDER", str(folder)))
    return folder / "skewed.yaml"


def measure(datasets, order: DataOrder, seed: int, ranks: int, accum: int, steps: int, models) -> dict:
    """Padding share and per-step rank imbalance of ``steps`` steps the order deals to ``ranks`` x ``accum``."""
    mixture = Mixture(datasets, seed)
    per_rank = [order.slots(StreamState(), rank, ranks) for rank in range(ranks)]
    real = padded = 0
    imbalance = {name: [] for name in models}
    for _ in range(steps):
        load = {name: np.zeros(ranks) for name in models}
        for rank, slots in enumerate(per_rank):
            for _ in range(accum):
                for part in mixture.build(next(slots)).tasks.values():
                    for segment in (part.source, part.inputs):
                        rows, length = segment.mask.shape
                        real, padded = real + int(segment.mask.sum()), padded + rows * length
                        for name, model in models.items():
                            load[name][rank] += model.padded(np.full((rows, 1), length))
        for name in models:
            imbalance[name].append(load[name].max() / load[name].mean())
    return {"padding": round(1 - real / padded, 3),
            **{f"rank_max_over_mean_{name}": {"worst": round(max(v), 3), "mean": round(float(np.mean(v)), 3)}
               for name, v in imbalance.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--samples", type=int, default=600, help="files of each modality")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = skewed_files(tmp, args.samples)
        job = resolve(config)
        job = resolve(config, prepare_tasks(job.cfg, job.manifests, job.tokenizers["text"], tmp / "prepared", 0, 1000))
        cfg, tokenizers = job.cfg, job.tokenizers
        datasets = build_datasets(cfg, "train", tokenizers, job.manifests)
        dim, k = cfg.model.backbone.dim, args.ranks * args.accum
        models = {kind: cost_model(kind, dim) for kind in ("tokens", "attention")}
        sizes = {n: len(ds) for n, ds in datasets.items()}
        # Before: a fixed count per micro-batch, as many samples as the budget holds on average.
        lengths = {n: np.array([ds.lengths(i) for i in range(len(ds))]) for n, ds in datasets.items()}
        mean_cost = {kind: {n: float(model.costs(lengths[n]).mean()) for n in datasets}
                     for kind, model in models.items()}
        counts = {n: max(1, round(BUDGET[n] / mean_cost["tokens"][n])) for n in datasets}
        fixed = DataOrder(sizes, counts, "fixed", cfg.train.seed, slots_per_step=k)
        results = {"fixed count": {"batch_sizes": counts, **measure(datasets, fixed, cfg.train.seed, args.ranks,
                                                                    args.accum, args.steps, models)}}
        for kind, model in models.items():
            # in the cost's own units, holding as many samples as the token budget on average
            budget = {n: round(BUDGET[n] * mean_cost[kind][n] / mean_cost["tokens"][n]) for n in datasets}
            budgets = {n: Budget(budget[n] * k, 16, model, ds.lengths) for n, ds in datasets.items()}
            order = DataOrder(sizes, {}, "fixed", cfg.train.seed, budgets, slots_per_step=k)
            results[f"budget ({kind})"] = {"budgets": budget, **measure(datasets, order, cfg.train.seed, args.ranks,
                                                                         args.accum, args.steps, models)}
    print(f"{args.ranks} ranks x {args.accum} micro-batches per step, {args.steps} steps; rank load = padded cost "
          f"of its micro-batches, max over mean (worst step / mean of steps)")
    print(f"{'micro-batches':<20} {'padding':>8} {'load, tokens':>16} {'load, attention':>16}")
    for name, row in results.items():
        cells = [f"{row[f'rank_max_over_mean_{m}']['worst']:.3f}/{row[f'rank_max_over_mean_{m}']['mean']:.3f}"
                 for m in models]
        print(f"{name:<20} {row['padding']:>8.3f} {cells[0]:>16} {cells[1]:>16}")
    print(json.dumps({"bench": "data_balance", "ranks": args.ranks, "accum": args.accum, "results": results}))


if __name__ == "__main__":
    sys.exit(main())
