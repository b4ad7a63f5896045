"""Training throughput on one CUDA GPU: the ~1B decoder per attention kernel, ViT-B/16 vs timm, attention alone.

Decoder: the ``decoder_1b`` preset at seq 2048 under bf16 autocast, one full
training step (forward, backward, fused AdamW) per kernel that can take the
call; tokens/s and MFU = model FLOPs/s (``polytrain.models.flops``, PaLM's
count) / the GPU's dense bf16 peak.  ViT-B/16: polytrain holding timm's
``vit_base_patch16_224`` weights (``convert.load_state``) vs timm itself,
same batch and step, taking turns; images/s.  Attention: one bf16 forward +
backward per kernel at head dim 128, seq 4096, causal and full; TFLOP/s by
FlashAttention's count (4 B H L^2 D per forward, halved when causal; backward
2.5 x forward).  A kernel that cannot take a call gets its reason instead of
figures.  Goals: MFU >= 55%, ViT >= 1.3x timm.  Needs CUDA; on CPU use
``bench/step_cpu.py``.

    python bench/step_gpu.py [--batch 4] [--seq 2048] [--steps 10] [--vit-batch 128] [--peak-tflops N]
                             [--no-compile] [--out FILE]

Last line: one JSON object with the figures (``--out`` also writes it after every figure, so a run
stopped early keeps what it measured).
"""

import argparse
import json
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from side_by_side import race

from polytrain.config.registries import PRESETS
from polytrain.errors import PolytrainError
from polytrain.models import convert
from polytrain.models.attention import plan_attention
from polytrain.models.attention_mask import MaskRule
from polytrain.models.flops import TrainFlops
from polytrain.models.heads import text_segment
from polytrain.models.presets import build
from polytrain.tokenizers.image import patchify
from polytrain.tokens import Segment, TaskBatch

DENSE_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H200": 989.0,
                     "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
"""Vendor dense (no sparsity) bf16 tensor-core peaks, by a fragment of ``torch.cuda.get_device_name()``."""
DECODER_KERNELS = ("sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "flash_attn")
ATTENTION = {"batch": 4, "seq": 4096, "heads": 16, "head_dim": 128}
"""The attention benchmark's call: 16k tokens per step, 16 heads of 128 (model dim 2048), as many key/value heads."""
FORWARD_AND_BACKWARD = 3.5
"""FLOPs of forward + backward over those of the forward (FlashAttention's count: backward = 2.5 x forward)."""


def peak_tflops(override: float | None) -> float:
    if override is not None:
        return override
    name = torch.cuda.get_device_name()
    for fragment, tflops in DENSE_BF16_TFLOPS.items():
        if fragment in name:
            return tflops
    sys.exit(f"step_gpu.py: no bf16 peak known for {name!r} (known: {', '.join(DENSE_BF16_TFLOPS)}); "
             "pass --peak-tflops")


def training_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One forward + backward + fused AdamW step under bf16 autocast."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def run() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def attempt(measure: Callable[[], dict]) -> dict:
    """``measure()``'s figures, or why the kernel refused the call: polytrain's reason, or torch's when an
    SDPA backend held to itself rejects the inputs (torch warns why, then raises "No available kernel")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return measure()
        except PolytrainError as err:
            return {"error": str(err)}
        except RuntimeError as err:  # also out of memory: the figure is missing either way, and says why
            reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
            return {"error": "; ".join([str(err).strip().splitlines()[0], *reasons[:4]])}


def sized(preset, **backbone):
    """``preset`` with ``backbone`` fields changed (``attention=...``, ``compile=True``)."""
    return replace(preset, model=replace(preset.model, backbone=replace(preset.model.backbone, **backbone)))


def decoder(kernel: str, batch: int, seq: int, steps: int, compiled: bool, peak: float) -> dict:
    """tokens/s and MFU of ``decoder_1b`` with attention ``kernel``."""
    preset = sized(PRESETS.get("decoder_1b"), attention=kernel, compile=compiled)
    model = build(preset, "cuda").train()
    vocab = preset.specs[0].input_dim
    ids = torch.randint(0, vocab, (batch, seq + 1), device="cuda")
    lm = TaskBatch(text_segment(ids[:, :-1]), ids[:, 1:])
    try:
        seconds = race({kernel: training_step(model, lambda built=model: built({"lm": lm})["lm"])}, steps,
                       sync=torch.cuda.synchronize)[kernel].wall
    finally:
        del model
        torch.cuda.empty_cache()
    tokens_per_s = batch * seq / seconds
    row = TaskBatch(text_segment(torch.zeros(1, seq, dtype=torch.long)), torch.zeros(1, seq, dtype=torch.long))
    flops_per_token = TrainFlops(build(preset, "meta"))({"lm": row}) / seq
    return {"tokens_per_s": round(tokens_per_s), "mfu": round(tokens_per_s * flops_per_token / (peak * 1e12), 4),
            "ms": round(1000 * seconds, 1)}


def vit_base(batch: int, steps: int, compiled: bool) -> dict:
    """images/s of timm's ViT-B/16 and of polytrain holding the same weights, taking turns."""
    torch.manual_seed(0)
    reference = timm.create_model("vit_base_patch16_224", pretrained=False).cuda().train()
    ours = build(sized(PRESETS.get("vit_base_patch16_224"), compile=compiled), "cuda").train()
    convert.load_state(ours, "classify", "timm", reference.state_dict())
    pixels = torch.randn(batch, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 1000, (batch,), device="cuda")
    patches = Segment.collate([patchify(p, 16) for p in pixels.cpu()]).to("cuda")  # the tokenizer's job, untimed
    classify = TaskBatch(patches, labels)
    seconds = race({"timm": training_step(reference, lambda: F.cross_entropy(reference(pixels), labels)),
                    "polytrain": training_step(ours, lambda: ours({"classify": classify})["classify"])},
                   steps, sync=torch.cuda.synchronize)
    per_s = {name: batch / t.wall for name, t in seconds.items()}
    return {"images_per_s": {name: round(v, 1) for name, v in per_s.items()},
            "speedup_vs_timm": round(per_s["polytrain"] / per_s["timm"], 3)}


def attention(kernel: str, causal: bool, steps: int) -> dict:
    """Forward + backward TFLOP/s of ``kernel`` alone on the ``ATTENTION`` call, bf16."""
    batch, seq, heads, head_dim = ATTENTION["batch"], ATTENTION["seq"], ATTENTION["heads"], ATTENTION["head_dim"]
    valid = torch.ones(batch, seq, dtype=torch.bool, device="cuda")
    plan = plan_attention(kernel, MaskRule(valid, valid, causal=causal), torch.bfloat16, head_dim, 0.0)
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def step() -> None:
        torch.autograd.grad(plan(q, k, v, 0.0), (q, k, v), grad)

    seconds = race({kernel: step}, steps, sync=torch.cuda.synchronize)[kernel].wall
    forward = 4 * batch * heads * seq**2 * head_dim * (0.5 if causal else 1.0)
    return {"tflops": round(forward * FORWARD_AND_BACKWARD / seconds / 1e12, 1), "ms": round(1000 * seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="decoder rows per step")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--vit-batch", type=int, default=128)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    parser.add_argument("--no-compile", action="store_true", help="run the blocks eagerly")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here, after each one")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("step_gpu.py needs a CUDA GPU and torch.cuda.is_available() is False here; "
                 "for CPU step times run bench/step_cpu.py")
    peak = peak_tflops(args.peak_tflops)
    compiled = not args.no_compile
    print(f"{torch.cuda.get_device_name()}, peak {peak:g} bf16 TFLOP/s, torch {torch.__version__}; "
          f"median of {args.steps} steps")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_tflops": peak,
               "compiled": compiled, "steps": args.steps, "goal": "MFU >= 0.55; ViT >= 1.3x timm",
               "decoder_1b": {}, "attention": {}}

    def record(section: dict, key: str, figures: dict, about: str) -> None:
        section[key] = figures
        print(f"{about}  {figures}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results))

    for kernel in DECODER_KERNELS:
        figures = attempt(lambda: decoder(kernel, args.batch, args.seq, args.steps, compiled, peak))
        record(results["decoder_1b"], kernel, figures, f"decoder_1b seq {args.seq} x {args.batch}  {kernel:15s}")
    figures = attempt(lambda: vit_base(args.vit_batch, args.steps, compiled))
    record(results, "vit_base_patch16_224", figures, f"vit_base_patch16_224 batch {args.vit_batch}")
    for mask in ("causal", "full"):
        for kernel in DECODER_KERNELS:
            figures = attempt(lambda: attention(kernel, mask == "causal", args.steps))
            record(results["attention"], f"{mask}/{kernel}", figures,
                   f"attention {mask} seq {ATTENTION['seq']} head dim {ATTENTION['head_dim']}  {kernel:15s}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
