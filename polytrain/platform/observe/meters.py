"""What a run measures about itself while it trains: throughput, MFU against the devices' peak, memory.

MFU (model FLOPs utilization, Chowdhery et al. 2022) = the model FLOPs of the
steps (``polytrain.models.flops``: 6 x the weights a token meets + the attention
square counted whole, no causal halving, as torchtitan and PaLM count) / (their
wall time x devices x one device's peak FLOP/s in the training precision).  The
peak is the configured ``tracking.peak_tflops``, or looked up from the GPU's name
in ``PEAK_TFLOPS``; with neither (CPUs, unlisted GPUs) there is no MFU.
``PEAK_TFLOPS`` is the one table of peaks: training runs and ``bench/step_gpu.py``
read it, and ``polytrain report`` shows the MFU the run logged with it.
"""

from __future__ import annotations

import gc
import re

import psutil
import torch

GIB = 2**30
TERA = 1e12

PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H[12]00.*NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100.*PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100|H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"V100.*SXM", {"fp16": 125.0, "fp32": 15.7}),
    (r"V100.*PCIE", {"fp16": 112.0, "fp32": 14.0}),
    (r"MI300X", {"bf16": 1307.4, "fp16": 1307.4, "tf32": 653.7, "fp32": 163.4}),
)
"""Vendor dense (no sparsity) peaks of one device in TFLOP/s, per training precision, by the first pattern
that ``torch.cuda.get_device_name()`` matches (more specific patterns first).  "tf32" is fp32 training
with TF32 matmuls allowed (``torch.set_float32_matmul_precision("high")``); "fp32" is with them off."""


def matmul_precision(precision: str) -> str:
    """The column of ``PEAK_TFLOPS`` that training in ``precision`` (engine.precision) runs at."""
    if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return precision


def listed_peak(device_name: str, column: str) -> float | None:
    """FLOP/s of ``PEAK_TFLOPS`` for this device name and column (bf16, fp16, tf32, fp32), or None."""
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return None if column not in peaks else peaks[column] * TERA
    return None


def peak_flops(configured_tflops: float | None, precision: str, device: torch.device) -> float | None:
    """One device's peak FLOP/s: the configured one, else the listed one for this GPU, else None."""
    if configured_tflops is not None:
        return configured_tflops * TERA
    if device.type != "cuda":
        return None
    return listed_peak(torch.cuda.get_device_name(device), matmul_precision(precision))


class Throughput:
    """Samples, input tokens and model FLOPs of the training steps since the last ``reset``, and their time.

    The time is that of the steps alone on the main process (evaluations and checkpoints between steps
    are left out); the counts are those of all processes.
    """

    def __init__(self, world_size: int, peak: float | None):
        self.world_size, self.peak = world_size, peak
        self.reset()

    def reset(self) -> None:
        self.steps, self.seconds, self.samples, self.tokens = 0, 0.0, 0, 0
        self.flops: float | None = 0.0

    def add(self, seconds: float, samples: int, tokens: int, flops: float | None) -> None:
        """One step: its wall time and what all processes consumed and computed (None: no FLOP count)."""
        self.steps += 1
        self.seconds += seconds
        self.samples += samples
        self.tokens += tokens
        self.flops = None if flops is None or self.flops is None else self.flops + flops

    def rates(self) -> dict[str, float]:
        """samples_per_s, tokens_per_s, step_time_s; tflops (per device) where FLOPs are counted; mfu
        where the peak is known too."""
        rates = {"samples_per_s": self.samples / self.seconds, "tokens_per_s": self.tokens / self.seconds,
                 "step_time_s": self.seconds / self.steps}
        if self.flops is not None:
            per_device = self.flops / self.seconds / self.world_size
            rates["tflops"] = per_device / TERA
            if self.peak is not None:
                rates["mfu"] = per_device / self.peak
        return rates


def memory_gib(device: torch.device) -> dict[str, float]:
    """This process's memory, in GiB: on a GPU the peaks allocated and reserved by torch since the last
    call (which starts a new peak), on CPU the resident set size now."""
    if device.type == "cuda":
        peaks = {"memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
                 "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}
        torch.cuda.reset_peak_memory_stats(device)
        return peaks
    return {"memory/rss_gib": psutil.Process().memory_info().rss / GIB}
def tensor_bytes() -> int:
    """Bytes this process holds in tensors: allocated GPU memory, or on CPU the live tensor storages."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        # Only plain tensors and parameters own storage; subclasses such as torch.compile's fake and
        # functional tensors (left alive by compiled code) have none and refuse data_ptr().
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.device.type == "cpu" and obj.layout == torch.strided:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


class StateProbe:
    """Measures what the model, its gradients and the optimizer states add to a rank's tensor memory.

    Create it before the model exists, then ``attach`` it to the optimizer; after the first training
    step, ``take`` hands out (once) the largest growth of ``tensor_bytes`` seen right after the
    optimizer stepped, when parameters, gradients and optimizer states all exist and the activations
    are gone.  DeepSpeed's ZeRO optimizers step the torch optimizer once per parameter group (or
    sub-group), so the optimizer states are complete only after the last of those calls: the probe
    measures after every one of them and keeps the largest.  (Resident memory is not used: the
    allocator keeps freed pages, so it would not show what ZeRO shards away.)
    """

    def __init__(self):
        self.baseline = tensor_bytes()
        self.measured: int | None = None
        self.handle = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.handle = optimizer.register_step_post_hook(self.after_step)

    def after_step(self, optimizer, args, kwargs) -> None:
        self.measured = max(self.measured or 0, tensor_bytes() - self.baseline)

    def take(self) -> int | None:
        """The measurement once the first optimizer step is over (then never again); None before it."""
        if self.measured is None:
            return None
        self.handle.remove()
        measured, self.measured = self.measured, None
        return measured
