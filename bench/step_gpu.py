"""Training throughput on one CUDA GPU: the ~1B decoder per attention kernel, ViT-B/16 vs timm, attention alone.

Decoder: the ``decoder_1b`` preset at seq 2048 under bf16 autocast, one full training step (forward,
backward, fused AdamW) per kernel that can take the call; tokens/s and MFU.  ViT-B/16: polytrain holding
timm's ``vit_base_patch16_224`` weights (``convert.load_state``) vs timm itself, same batch and step,
taking turns; images/s.  Attention: one bf16 forward + backward per kernel at head dim 128, seq 4096,
causal and full; TFLOP/s by FlashAttention's count (4 B H L^2 D per forward, halved when causal; backward
2.5 x forward).  A kernel that cannot take a call gets its reason instead of figures (``refused``: the
dispatcher's ``why_not``, or torch's own), and any other exception its last line (``error``), so one row's
failure costs no other row.  FlexAttention's rows come last: they compile, so a run stopped early loses
only them.  Goals: MFU >= 55%, ViT >= 1.3x timm.

MFU = model FLOPs/s (``polytrain.models.flops``: 6 x the weights a token meets + the attention square counted
whole, no causal halving, as torchtitan and PaLM count) / the GPU's dense bf16 peak
(``polytrain.platform.observe.meters.PEAK_TFLOPS``, the table training runs use).  ``mfu_causal_halved``
counts only the half of the square a causal mask keeps, as Megatron's newer counts (NeMo, Megatron-Bridge) do.

``--device cpu`` runs every line at the ``SIZES["cpu"]`` sizes (a 2-layer Llama-style decoder, timm's
ViT-Ti/16, a 128-token attention call) with the kernels the CPU has; ``tests/test_bench_step_gpu.py`` runs
it so.  For CPU step times beside timm and Hugging Face use ``bench/step_cpu.py``.

    python bench/step_gpu.py [--device cuda] [--batch 4] [--seq 2048] [--steps 10] [--vit-batch 128]
                             [--peak-tflops N] [--no-compile] [--out FILE]

Last line: one JSON object with the figures (``--out`` also writes it after every figure, so a run
stopped early keeps what it measured).
"""

import argparse
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from side_by_side import race

from polytrain.config import presets
from polytrain.config.registries import PRESETS
from polytrain.errors import PolytrainError
from polytrain.models import convert
from polytrain.models.attention import plan_attention
from polytrain.models.attention_mask import MaskRule
from polytrain.models.flops import TrainFlops
from polytrain.models.heads import text_segment
from polytrain.models.presets import build
from polytrain.platform.observe.meters import TERA, peak_flops
from polytrain.tokenizers.image import patchify
from polytrain.tokens import Segment, TaskBatch

DECODER_KERNELS = ("sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "flash_attn")
ATTENTION_KERNELS = ("sdpa_math", *DECODER_KERNELS)
"""The attention rows add SDPA's math backend, the plain-PyTorch baseline (the decoder's would not fit)."""
FORWARD_AND_BACKWARD = 3.5
"""FLOPs of forward + backward over those of the forward (FlashAttention's count: backward = 2.5 x forward)."""
SDPA_REFUSALS = ("No available kernel", "No viable backend")
"""How torch's SDPA says (on CUDA, on CPU) that the backends it was held to cannot take the inputs."""


@dataclass(frozen=True)
class Sizes:
    """What the benchmark runs on one kind of device."""

    decoder: str
    """The decoder's name in the figures."""
    decoder_preset: presets.Preset
    batch: int
    """Decoder rows per step."""
    seq: int
    vit: str
    """A timm model name that is also a polytrain preset holding its weights."""
    vit_batch: int
    attention: tuple[int, int, int, int]
    """The attention call: batch, seq, heads (as many key/value heads), head dim."""
    steps: int
    """Timed steps per model (the median is reported)."""
    warmup: int


SIZES = {
    "cuda": Sizes("decoder_1b", PRESETS.get("decoder_1b"), 4, 2048, "vit_base_patch16_224", 128,
                  (4, 4096, 16, 128), steps=10, warmup=3),
    "cpu": Sizes("llama_tiny", presets.Preset("decoder_1b's shape at toy size", presets.llama(64, 2, 4, 2, 172),
                                              (presets.Spec("text", 512, (1, 32)),), {"lm": "decoder_only"}), 2, 32,
                 "vit_tiny_patch16_224", 1, (2, 128, 4, 64), steps=1, warmup=0),
}
"""By device type: a GPU's figures, and the CPU's rehearsal of the same code at sizes it runs in seconds."""


def training_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor], device: torch.device
                  ) -> Callable[[], None]:
    """One forward + backward + fused AdamW step under bf16 autocast."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def run() -> None:
        with torch.autocast(device.type, torch.bfloat16):
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def timed(steps: dict[str, Callable[[], None]], sizes: Sizes, device: torch.device) -> dict[str, float]:
    """Median wall seconds per step of each entry, taking turns (``side_by_side.race``)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    return {name: t.wall for name, t in race(steps, sizes.steps, sizes.warmup, sync=sync).items()}


def attempt(measure: Callable[[], dict]) -> dict:
    """``measure()``'s figures; or why the kernel refused the call: polytrain's ``why_not``, or torch's when an
    SDPA backend held to itself rejects the inputs (torch warns why, then raises); or any other error's last
    line (out of memory, a bug), so that one row's failure costs no other row."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return measure()
        except PolytrainError as err:
            return {"refused": str(err)}
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            if isinstance(err, RuntimeError) and any(refusal in first for refusal in SDPA_REFUSALS):
                reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
                return {"refused": "; ".join([first, *reasons[:4]])}
            return {"error": f"{type(err).__name__}: {first}"}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def figures(value: float) -> float:
    """Four significant figures."""
    return float(f"{value:.4g}")


def sized(preset: presets.Preset, **backbone) -> presets.Preset:
    """``preset`` with ``backbone`` fields changed (``attention=...``, ``compile=True``)."""
    return replace(preset, model=replace(preset.model, backbone=replace(preset.model.backbone, **backbone)))


def flops_per_token(model, seq: int) -> dict[str, float]:
    """Training FLOPs per token of a decoder fed ``seq``-token rows, as the run counts them (``TrainFlops``: 6N +
    the attention square whole), and with the square halved where a causal mask skips it."""
    counter, rows = TrainFlops(model), torch.tensor([seq])
    whole = counter({"lm": TaskBatch(text_segment(torch.zeros(1, seq, dtype=torch.long)),
                                     torch.zeros(1, seq, dtype=torch.long))})
    return {"": whole / seq, "_causal_halved": (whole - counter.self_attention(rows) / 2) / seq}


def decoder(kernel: str, sizes: Sizes, device: torch.device, compiled: bool, peak: float | None) -> dict:
    """tokens/s, model TFLOP/s and MFU (both counts) of the decoder with attention ``kernel``."""
    preset = sized(sizes.decoder_preset, attention=kernel, compile=compiled)
    model = build(preset, device).train()
    vocab = preset.specs[0].input_dim
    ids = torch.randint(0, vocab, (sizes.batch, sizes.seq + 1), device=device)
    lm = TaskBatch(text_segment(ids[:, :-1]), ids[:, 1:])
    seconds = timed({kernel: training_step(model, lambda: model({"lm": lm})["lm"], device)}, sizes, device)[kernel]
    tokens_per_s = sizes.batch * sizes.seq / seconds
    flops = flops_per_token(build(preset, "meta"), sizes.seq)
    result = {"tokens_per_s": round(tokens_per_s), "ms": figures(1000 * seconds),
              "tflops": figures(tokens_per_s * flops[""] / TERA)}
    if peak is not None:
        result.update({f"mfu{count}": figures(tokens_per_s * per_token / peak) for count, per_token in flops.items()})
    return result


def vit(sizes: Sizes, device: torch.device, compiled: bool) -> dict:
    """images/s of timm's ViT and of polytrain holding the same weights, taking turns."""
    torch.manual_seed(0)
    reference = timm.create_model(sizes.vit, pretrained=False).to(device).train()
    ours = build(sized(PRESETS.get(sizes.vit), compile=compiled), device).train()
    convert.load_state(ours, "classify", "timm", reference.state_dict())
    pixels = torch.randn(sizes.vit_batch, 3, 224, 224)
    labels = torch.randint(0, 1000, (sizes.vit_batch,))
    classify = TaskBatch(Segment.collate([patchify(p, 16) for p in pixels]), labels).to(device)  # untimed
    pixels, labels = pixels.to(device), labels.to(device)
    seconds = timed({"timm": training_step(reference, lambda: F.cross_entropy(reference(pixels), labels), device),
                     "polytrain": training_step(ours, lambda: ours({"classify": classify})["classify"], device)},
                    sizes, device)
    per_s = {name: sizes.vit_batch / t for name, t in seconds.items()}
    return {"images_per_s": {name: figures(v) for name, v in per_s.items()},
            "speedup_vs_timm": figures(per_s["polytrain"] / per_s["timm"])}


def attention(kernel: str, causal: bool, sizes: Sizes, device: torch.device) -> dict:
    """Forward + backward TFLOP/s of ``kernel`` alone on the sizes' attention call, bf16."""
    batch, seq, heads, head_dim = sizes.attention
    valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
    plan = plan_attention(kernel, MaskRule(valid, valid, causal=causal), torch.bfloat16, head_dim, 0.0)
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def step() -> None:
        torch.autograd.grad(plan(q, k, v, 0.0), (q, k, v), grad)

    seconds = timed({kernel: step}, sizes, device)[kernel]
    forward = 4 * batch * heads * seq**2 * head_dim * (0.5 if causal else 1.0)
    return {"tflops": figures(forward * FORWARD_AND_BACKWARD / seconds / TERA), "ms": figures(1000 * seconds)}


@dataclass(frozen=True)
class Row:
    section: str
    """The figures' section the row goes in, under ``key``."""
    key: str
    about: str
    """The row's label in the printed table."""
    measure: Callable[[], dict]
    kernel: str | None = None


def rows(sizes: Sizes, device: torch.device, compiled: bool, peak: float | None) -> list[Row]:
    """Every row of the table, in the order run: FlexAttention's last, as they compile."""
    batch, seq, heads, head_dim = sizes.attention
    table = [Row("decoder", kernel, f"{sizes.decoder} seq {sizes.seq} x {sizes.batch}  {kernel:15s}",
                 lambda kernel=kernel: decoder(kernel, sizes, device, compiled, peak), kernel)
             for kernel in DECODER_KERNELS]
    table.append(Row("vit", sizes.vit, f"{sizes.vit} batch {sizes.vit_batch}", lambda: vit(sizes, device, compiled)))
    table += [Row("attention", f"{mask}/{kernel}", f"attention {mask} seq {seq} x {batch} head dim {head_dim}  "
                  f"{kernel:15s}", lambda kernel=kernel, mask=mask: attention(kernel, mask == "causal", sizes, device),
                  kernel)
              for mask in ("causal", "full") for kernel in ATTENTION_KERNELS]
    return sorted(table, key=lambda row: row.kernel == "flex")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=sorted(SIZES),
                        help="cuda: the figures; cpu: every line at the CPU's sizes")
    parser.add_argument("--batch", type=int, default=None, help="decoder rows per step (default: by device)")
    parser.add_argument("--seq", type=int, default=None, help="decoder sequence length (default: by device)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default: by device)")
    parser.add_argument("--vit-batch", type=int, default=None, help="ViT images per step (default: by device)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU where it is not listed (CPUs, unlisted GPUs)")
    parser.add_argument("--no-compile", action="store_true", help="run the blocks eagerly")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here, after each one")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "step_gpu.py: torch.cuda.is_available() is False here; --device cpu runs every line at "
                       "the CPU's sizes, and bench/step_cpu.py measures CPU step times\n")
    device = torch.device(args.device)
    defaults = SIZES[args.device]
    sizes = replace(defaults, **{name: getattr(args, name) for name in ("batch", "seq", "steps", "vit_batch")
                                 if getattr(args, name) is not None})
    peak = peak_flops(args.peak_tflops, "bf16", device)
    compiled = not args.no_compile
    name = device_name(device)
    print(f"{name}, torch {torch.__version__}; median of {sizes.steps} steps after {sizes.warmup}; MFU: model FLOPs "
          f"(6N + attention's whole square) / {f'{peak / TERA:g} bf16 TFLOP/s' if peak else 'no peak known'}; "
          "mfu_causal_halved: the square halved")
    results = {"device": name, "torch": torch.__version__, "peak_tflops": peak and peak / TERA, "compiled": compiled,
               "steps": sizes.steps, "decoder_model": sizes.decoder,
               "mfu_counts": {"mfu": "6N + attention's full square, no causal halving (torchtitan, PaLM)",
                              "mfu_causal_halved": "6N + half the square (Megatron's newer counts)"},
               "goal": "MFU >= 0.55; ViT >= 1.3x timm", "decoder": {}, "vit": {}, "attention": {}}
    if peak is None:
        print(f"no bf16 peak listed for {name!r} (polytrain.platform.observe.meters.PEAK_TFLOPS): no MFU; "
              "pass --peak-tflops")
    for row in rows(sizes, device, compiled, peak):
        measured = attempt(row.measure)
        results[row.section][row.key] = measured
        print(f"{row.about}  {measured}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
