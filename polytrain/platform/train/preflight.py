"""What a config asks of the machine a job runs on, checked where the job starts, before any process group.

Reading a config checks values only (it may happen on a login node without
GPUs, or without the data); these checks need this machine: its devices,
what its CPU can compute, and the files the config names.  Each failure is
one line naming the key, the value and what to do instead.
"""

import platform
from pathlib import Path

import torch

from polytrain.config import Config
from polytrain.errors import ConfigError
from polytrain.platform.train.derive import check_sources, foreign
from polytrain.platform.train.sources import open_sources


def preflight(cfg: Config) -> None:
    engine = cfg.engine
    cuda = torch.cuda.is_available()
    if engine.dist_backend == "nccl" and not cuda:
        raise ConfigError("engine.dist_backend", engine.dist_backend, "needs CUDA GPUs, and this machine has none; "
                          "use gloo or auto")
    if engine.precision == "fp16" and not cuda and not cpu_has_fp16():
        raise ConfigError("engine.precision", engine.precision, f"this machine's CPU ({cpu_name()}) cannot train in "
                          f"fp16 (oneDNN reports no fp16 support); use engine.precision=bf16 or fp32")
    for key, path in (("tokenizers.text.path", cfg.tokenizers.text.path), ("train.resume", cfg.train.resume)):
        if path and not Path(path).exists():
            raise ConfigError(key, path, "no such file or directory on this machine")
    # a resumed run has its own weights; its architecture still comes from the checkpoints
    check_sources(cfg, foreign(cfg) if cfg.train.resume else open_sources(cfg.finetune))


def cpu_has_fp16() -> bool:
    """Whether oneDNN computes fp16 on this CPU (AVX-512 FP16 or AMX-FP16; DeepSpeed's CPU accelerator asks
    the same before it accepts fp16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_name() -> str:
    """The CPU's model name, as the kernel reports it (``/proc/cpuinfo``), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
