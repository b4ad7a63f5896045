"""Training parity: the masked-LM recipe beside Hugging Face ``BertForMaskedLM``, and its decoder beside
``GPT2LMHeadModel``, trained on the same batches, held-out loss side by side.

The masked arm is ``configs/mlm.yaml`` (``model.preset: bert_base`` shrunk) with BERT's learned position table in
place of the recipe's RoPE (``LIBRARY_POSITIONS``: neither library model has RoPE): the standard library's sources
in windows of 64 tokens that keep their file boundaries, masks drawn by the data pipeline.  The decoder arm is
the same recipe made a GPT-2-shaped causal LM of the same size on the same windows (``decoder_overrides``).
polytrain's model is the one ``polytrain train`` builds; the library's is built from the config ``polytrain
export --format hf`` writes for it (``checked_config``: the same architecture in every setting that changes what
it computes), each side initialized as it initializes itself (seed ``train.seed``).  Both read the same batches
(packed windows: the library model gets the documents' positions and a mask that keeps each document to itself),
with the recipe's AdamW (no decay for vectors and embedding tables), warmup + cosine schedule and gradient
clipping, in a plain loop; then the same held-out batches (the evaluation's, masks included).  Goal: held-out
loss polytrain / HF <= 1.02.

    python bench/lm_parity.py [--steps 300] [--evals 3] [--arms masked_lm decoder] [key=value ...]

``key=value`` overrides the recipe (e.g. ``data.cache_dir=/tmp/data``).  Last line: one JSON object with the figures.
"""

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn

from polytrain import job
from polytrain.config import Config
from polytrain.config.registries import FAMILIES
from polytrain.models.convert import Architecture
from polytrain.models.convert.expressible import checked_config
from polytrain.models.heads import token_loss
from polytrain.platform.data.datasets import build_datasets
from polytrain.platform.data.loader import Mixture, eval_batches
from polytrain.platform.data.order import DataOrder, StreamState
from polytrain.platform.train.evaluate import entropy
from polytrain.platform.train.optimizer import lr_multiplier, param_groups
from polytrain.tokenizers.text import TextTokenizer
from polytrain.tokens import IGNORE_INDEX, TaskBatch

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "mlm.yaml"
ARMS = {"masked_lm": "BertForMaskedLM", "decoder": "GPT2LMHeadModel"}
"""Each arm and the Hugging Face class it is compared with."""
LIBRARY_POSITIONS = "model.backbone.position=learned"
"""BERT's and GPT-2's positions, a learned table: both arms use it, whatever the recipe says."""


def decoder_overrides(cfg: Config) -> list[str]:
    """The masked-LM recipe as a GPT-2-shaped causal LM with as many blocks, on the same task's windows."""
    (task,) = cfg.data.tasks
    return ["model.preset=gpt2", "model.backbone.encoder_layers=0",
            f"model.backbone.decoder_layers={cfg.model.backbone.encoder_layers}",
            f"data.tasks.{task}.head=decoder_only"]


def train_batches(cfg: Config, dataset, steps: int) -> list[TaskBatch]:
    """The first ``steps`` micro-batches of the run's data order (one process), as ``polytrain train`` draws them."""
    (task,) = cfg.data.tasks
    order = DataOrder({task: len(dataset)}, {task: cfg.data.tasks[task].batch_size}, "fixed", cfg.train.seed)
    slots, mixture = order.slots(StreamState(), rank=0, world_size=1), Mixture({task: dataset}, cfg.train.seed)
    return [mixture.build(next(slots)).tasks[task] for _ in range(steps)]


def library_model(cfg: Config, text: TextTokenizer, head: str, name: str) -> nn.Module:
    """The Hugging Face model ``polytrain export`` would write for ``cfg``'s model, randomly initialized."""
    config = checked_config(FAMILIES.get(name), Architecture(cfg.model, text.embed_spec(), head))
    config.update(bos_token_id=text.bos_id, eos_token_id=text.eos_id, pad_token_id=text.pad_id)
    torch.manual_seed(cfg.train.seed)
    return getattr(transformers, name)(transformers.AutoConfig.for_model(config.pop("model_type"), **config))


def library_forward(model: nn.Module, causal: bool) -> Callable[[TaskBatch], torch.Tensor]:
    """Logits of the library's model on a polytrain batch: its ids at the documents' own positions, each token
    attending to its document (the past of it, ``causal``); padding attends to itself only."""
    def forward(batch: TaskBatch) -> torch.Tensor:
        inputs = batch.inputs
        documents = inputs.documents if inputs.documents is not None else torch.zeros_like(inputs.values)
        allowed = (documents[:, :, None] == documents[:, None, :]) & inputs.mask[:, None, :] & inputs.mask[:, :, None]
        if causal:
            allowed = allowed.tril()
        allowed |= torch.eye(allowed.shape[-1], dtype=torch.bool)
        return model(input_ids=inputs.values, attention_mask=allowed[:, None],
                     position_ids=inputs.positions[..., 1]).logits
    return forward


def library_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """``param_groups``' rule for a library model: no decay for vectors and embedding tables (a tied output too)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = list(model.parameters())
    exempt = [p for p in params if p.ndim < 2 or id(p) in tables]
    return [{"params": [p for p in params if p.ndim >= 2 and id(p) not in tables], "weight_decay": weight_decay},
            {"params": exempt, "weight_decay": 0.0}]


@torch.no_grad()
def held_out_loss(model: nn.Module, forward: Callable[[TaskBatch], torch.Tensor], batches: list[TaskBatch]) -> float:
    """Nats per scored token over ``batches``."""
    model.eval()
    total = sum(float(token_loss(forward(b), b.labels, reduction="sum")) for b in batches)
    model.train()
    return total / sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)


class Side:
    """One model of a pair with its optimizer and schedule: steps, and its held-out loss when asked."""

    def __init__(self, model: nn.Module, forward: Callable[[TaskBatch], torch.Tensor], groups: list[dict], cfg: Config):
        self.model, self.forward, self.cfg = model.train(), forward, cfg.train
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=cfg.train.betas)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_multiplier(s, cfg.train))
        self.seconds = 0.0

    def step(self, batch: TaskBatch) -> None:
        began = time.perf_counter()
        token_loss(self.forward(batch), batch.labels).backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.seconds += time.perf_counter() - began


def run_arm(arm: job.Job, library: str, evals: int) -> dict:
    cfg, tokenizers = arm.cfg, arm.tokenizers
    (task,) = cfg.data.tasks
    train_set, val_set = (build_datasets(cfg, split, tokenizers, arm.manifests)[task] for split in ("train", "val"))
    batches = train_batches(cfg, train_set, cfg.train.steps)
    held_out = list(eval_batches(val_set, cfg.train.eval_batch_size, cfg.data.tasks[task].max_val_samples))
    torch.manual_seed(cfg.train.seed)
    ours, _ = arm.build_model()
    head = cfg.data.tasks[task].head
    theirs = library_model(cfg, tokenizers["text"], head, library)
    sides = {"polytrain": Side(ours, lambda b: ours.heads[task](ours, b), param_groups(ours, cfg.train.weight_decay),
                               cfg),
             "hf": Side(theirs, library_forward(theirs, causal=head == "decoder_only"),
                        library_groups(theirs, cfg.train.weight_decay), cfg)}
    checkpoints = {round(cfg.train.steps * (i + 1) / evals) for i in range(evals)}
    curve = {}
    for step, batch in enumerate(batches, 1):
        for side in sides.values():
            side.step(batch)
        if step in checkpoints:
            curve[step] = {name: held_out_loss(s.model, s.forward, held_out) for name, s in sides.items()}
            print(f"  step {step:5d}  held-out loss  polytrain {curve[step]['polytrain']:.4f}  hf "
                  f"{curve[step]['hf']:.4f}  ratio {curve[step]['polytrain'] / curve[step]['hf']:.4f}", flush=True)
    labels = Counter(t for b in held_out for t in b.labels[b.labels != IGNORE_INDEX].tolist())
    final = curve[cfg.train.steps]
    return {"reference": library, "val_loss": final, "ratio": round(final["polytrain"] / final["hf"], 4),
            "unigram_entropy": round(entropy(labels), 4), "curve": curve,
            "seconds_per_step": {name: round(s.seconds / cfg.train.steps, 4) for name, s in sides.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each model")
    parser.add_argument("--evals", type=int, default=3, help="held-out evaluations along the way (the last at the end)")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args()
    base = [LIBRARY_POSITIONS, *args.overrides, f"train.steps={args.steps}"]
    masked = job.resolve(args.recipe, base, 1)
    cfg = masked.cfg
    print(f"{args.recipe.name}, {args.steps} steps, torch {torch.__version__} on {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_file = Path(tmp) / "tokenizer.json"  # one tokenizer for both arms: the masked recipe's
        tokenizer_file.write_text(masked.tokenizer_json, encoding="utf-8")
        results = {}
        for arm in args.arms:
            arm_job = masked if arm == "masked_lm" else job.resolve(
                args.recipe, [*base, *decoder_overrides(cfg), f"tokenizers.text.path={tokenizer_file}"], 1)
            print(f"{arm}: polytrain beside {ARMS[arm]}", flush=True)
            results[arm] = run_arm(arm_job, ARMS[arm], args.evals)
            print(f"  unigram entropy {results[arm]['unigram_entropy']:.4f}; seconds per step "
                  f"{results[arm]['seconds_per_step']}")
    print(json.dumps({"bench": "lm_parity", "steps": args.steps, "goal": "polytrain / hf held-out loss <= 1.02",
                      **{f"ratio_{arm}": r["ratio"] for arm, r in results.items()}, **results}))


if __name__ == "__main__":
    main()
