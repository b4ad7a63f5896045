"""What a config asks of the machine a job runs on, checked where the job starts, before any process group.

Reading a config checks values only (it may happen on a login node without
GPUs, or without the data); these checks need this machine: its devices and
memory, what its CPU can compute, and the files and folders the config names.
Each failure is one line naming the key, the value and what to do instead.
"""

import os
import platform
from pathlib import Path
from typing import NoReturn

import psutil
import torch

from polytrain.atomic import unwritable
from polytrain.config import Config
from polytrain.errors import ConfigError
from polytrain.platform.distributed.memory_planner import configured, format_bytes, heaviest


def preflight(job) -> None:
    """Every check of what ``job`` (a ``polytrain.job.Job``) asks of this machine; the first that fails raises
    ``ConfigError``."""
    cfg = job.cfg
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
    for key, folder in (("train.out_dir", cfg.train.out_dir), ("data.cache_dir", cfg.data.cache_dir),
                        ("train.resume", cfg.train.resume)):
        reason = folder and unwritable(Path(folder))
        if reason:
            raise ConfigError(key, folder, f"the run writes there, but {reason}")
    cores = len(os.sched_getaffinity(0))
    if cfg.data.num_workers > cores:
        raise ConfigError("data.num_workers", cfg.data.num_workers, f"is more loader processes per training process "
                          f"than this machine's {cores} CPU core(s); use at most {cores}")
    check_memory(job, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def check_memory(job, local_processes: int) -> None:
    """The memory planner's bytes per rank for this job against what this machine gives each rank (a GPU, or
    its share of the CPU memory); too much names the value whose default would help most.  A vocabulary still to
    be trained counts as ``tokenizers.text.vocab_size`` tokens, its upper bound."""
    cfg, world_size = job.cfg, job.processes

    def need_of(candidate: Config):
        return configured(candidate, world_size, job.parameter_counts(candidate, exact=False), job.grids(candidate))

    try:
        need = need_of(cfg)
    except OverflowError as err:
        fail(cfg, need_of, f"needs {err}")
    host = psutil.virtual_memory().total // local_processes
    where = f"engine.zero_stage={cfg.engine.zero_stage} on {world_size} process(es)"
    parts = (f"parameters {format_bytes(need.params)}, gradients {format_bytes(need.grads)}, optimizer states "
             f"{format_bytes(need.optimizer)}, buffers {format_bytes(need.buffers)}, activations "
             f"{format_bytes(need.activations)}")
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        if need.device_total > gpu:
            fail(cfg, need_of, f"needs {format_bytes(need.device_total)} per GPU ({parts}) with {where}, and this "
                                  f"machine's GPUs have {format_bytes(gpu)}")
        if need.cpu > host:
            fail(cfg, need_of, f"offloads {format_bytes(need.cpu)} per process to CPU memory with {where}, and "
                                  f"this machine has {format_bytes(host)} per process")
    elif need.device_total + need.cpu > host:
        fail(cfg, need_of, f"needs {format_bytes(need.device_total + need.cpu)} per process ({parts}) with "
                              f"{where}, and this machine has {format_bytes(host)} of memory per process")


def fail(cfg: Config, need_of, reason: str) -> NoReturn:
    def total(candidate: Config) -> int:
        estimate = need_of(candidate)
        return estimate.states + estimate.activations

    key, value = heaviest(cfg, total) or ("model", None)
    raise ConfigError(key, value, f"the run {reason}")


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
