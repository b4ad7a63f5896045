"""Forward+backward step time on CPU: polytrain vs timm ViT-Tiny/16 and vs Hugging Face GPT-2, side by side.

Each pair holds the same weights (polytrain imports the reference's random
state dict through ``polytrain.models.convert``), the same batch and the same
loss (cross-entropy on the logits).  polytrain runs twice: eager, and with
each block compiled (``model.backbone.compile=true``).  All models take turns
step by step, so they see the same machine conditions; the figures are the
median wall-clock time of a step and its median CPU time (the work done,
steadier than the wall clock on a machine shared with other jobs).  Goal:
polytrain <= 0.9x the reference's time.

    python bench/step_cpu.py [--steps 15] [--vit-batch 8] [--gpt-batch 8] [--seq 128] [--no-compile] [--threads N]

Last line: one JSON object with the figures.
"""

import argparse
import json
from dataclasses import replace
from typing import Callable

import timm
import torch
import torch.nn.functional as F
import transformers
from side_by_side import race

from polytrain.config import presets
from polytrain.config.registries import PRESETS
from polytrain.models import convert
from polytrain.models.heads import text_segment
from polytrain.models.presets import build
from polytrain.tokenizers.image import patchify
from polytrain.tokens import Segment, TaskBatch

GPT2_TINY = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=4096, n_positions=256, bos_token_id=0, eos_token_id=0,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
"""The "tiny GPT-2" both sides are built with; no dropout, as polytrain's preset (and timm's ViT) has none."""


def step(model: torch.nn.Module, forward: Callable[[], torch.Tensor], labels: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model.zero_grad(set_to_none=True)
        logits = forward()
        F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten()).backward()

    return run


def sized(preset: presets.Preset, **backbone):
    """The preset's model with ``backbone`` fields changed (``compile=True``)."""
    model = replace(preset.model, backbone=replace(preset.model.backbone, **backbone))
    return build(replace(preset, model=model))


def vit_steps(batch: int, compiled: bool) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).train()
    pixels = torch.randn(batch, 3, 224, 224)
    patches = Segment.collate([patchify(p, 16) for p in pixels])
    labels = torch.randint(0, 1000, (batch,))
    steps = {"timm": step(reference, lambda: reference(pixels), labels)}
    variants = {"polytrain": False, "polytrain_compiled": True} if compiled else {"polytrain": False}
    for name, compile_blocks in variants.items():
        ours = sized(PRESETS.get("vit_tiny_patch16_224"), compile=compile_blocks).train()
        convert.load_state(ours, "classify", "timm", reference.state_dict())
        batch_ = TaskBatch(patches, labels)
        steps[name] = step(ours, lambda m=ours: m.heads["classify"](m, batch_), labels)
    return steps


def gpt2_steps(batch: int, seq: int, compiled: bool) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_TINY)).train()
    ids = torch.randint(0, GPT2_TINY["vocab_size"], (batch, seq + 1))
    inputs, labels = ids[:, :-1], ids[:, 1:]
    steps = {"hf": step(reference, lambda: reference(inputs).logits, labels)}
    variants = {"polytrain": False, "polytrain_compiled": True} if compiled else {"polytrain": False}
    for name, compile_blocks in variants.items():
        preset = presets.Preset("tiny GPT-2", presets.gpt2(GPT2_TINY["n_embd"], GPT2_TINY["n_layer"],
                                                           GPT2_TINY["n_head"]),
                                (presets.Spec("text", GPT2_TINY["vocab_size"], (1, GPT2_TINY["n_positions"])),),
                                {"lm": "decoder_only"})
        ours = sized(preset, compile=compile_blocks).train()
        convert.load_state(ours, "lm", "GPT2LMHeadModel", reference.state_dict())
        batch_ = TaskBatch(text_segment(inputs), labels)
        steps[name] = step(ours, lambda m=ours: m.heads["lm"](m, batch_), labels)
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="timed steps per model")
    parser.add_argument("--vit-batch", type=int, default=8)
    parser.add_argument("--gpt-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled polytrain variant")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled = not args.no_compile
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.steps} steps each")

    results = {}
    for family, reference, steps in (
            ("vit_tiny", "timm", vit_steps(args.vit_batch, compiled)),
            ("gpt2_tiny", "hf", gpt2_steps(args.gpt_batch, args.seq, compiled))):
        timings = race(steps, args.steps)
        ref = timings[reference]
        for name, t in timings.items():
            print(f"{family:10s} {name:20s} wall {1000 * t.wall:8.1f} ms ({t.wall / ref.wall:4.2f}x)   "
                  f"cpu {1000 * t.cpu:8.1f} ms ({t.cpu / ref.cpu:4.2f}x {reference})")
        results[family] = {
            "wall_ms": {k: round(1000 * t.wall, 1) for k, t in timings.items()},
            "cpu_ms": {k: round(1000 * t.cpu, 1) for k, t in timings.items()},
            "ratio": {k: round(t.wall / ref.wall, 3) for k, t in timings.items() if k != reference},
            "ratio_cpu_time": {k: round(t.cpu / ref.cpu, 3) for k, t in timings.items() if k != reference}}
    results["goal"] = "polytrain <= 0.9x reference"
    print(json.dumps(results))


if __name__ == "__main__":
    main()
