"""``polytrain doctor``: what this machine runs, and whether a config's DeepSpeed ops and launch tools are there.

Versions and GPUs come first, then one line per check: each DeepSpeed op the
config needs is built (or loaded from torch's extension cache) exactly as a
training run would, and the launcher's hostfile, rendezvous address and
commands are looked up.  Exit code 1 when a check fails.
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Callable

from polytrain.config.engine import EngineConfig
from polytrain.config.launch import LaunchConfig
from polytrain.errors import ConfigError
from polytrain.job import resolve
from polytrain.launch.hostfile import HostfileError, read_hostfile
from polytrain.launch.job import check_hosts

log = logging.getLogger(__name__)

PACKAGES = ("polytrain", "torch", "deepspeed", "accelerate", "transformers", "wandb")
"""Modules whose versions a bug report needs."""


@dataclass(frozen=True)
class Op:
    builder: str
    """DeepSpeed op builder class, as ``get_accelerator().create_op_builder`` names it."""
    why: str
    """Why a run needs it, for the report."""
    needed: Callable[[EngineConfig, str], bool]
    """(engine config, DeepSpeed accelerator name) -> whether a run loads this op."""


OPS = (
    Op("ShareMemCommBuilder", "DeepSpeed's collectives on CPU", lambda engine, accelerator: accelerator == "cpu"),
    Op("CPUAdamBuilder", "engine.offload_optimizer=true", lambda engine, accelerator: engine.offload_optimizer),
)


@dataclass(frozen=True)
class Check:
    name: str
    """What was checked: an op, a config key, a command."""
    ok: bool
    detail: str
    """What was found, or what fails without it."""


def doctor(config: str | None, overrides: list[str]) -> int:
    job = resolve(config, overrides) if config else None
    cfg = job.cfg if job else None
    engine = cfg.engine if cfg else EngineConfig()
    launch = cfg.launch if cfg else LaunchConfig()
    print(format_rows([*versions(), *gpus()]))
    print(f"checks for {config or 'the default settings'} (engine.zero_stage={engine.zero_stage}, "
          f"launch.backend={launch.backend}, {launch.nodes} node(s) x {launch.procs_per_node} process(es)):")
    if job is not None:
        log.info("%s", job.summary())
    checks = [*op_checks(engine), *launch_checks(launch)]
    for check in checks:
        print(f"  {'ok  ' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
    failed = [check.name for check in checks if not check.ok]
    print(f"{len(failed)} of {len(checks)} checks failed: {', '.join(failed)}" if failed else
          f"all {len(checks)} checks passed")
    return 1 if failed else 0


def versions() -> list[tuple[str, str]]:
    import torch

    rows = [("python", platform.python_version())]
    rows += [(name, module_version(name)) for name in PACKAGES]
    if torch.version.cuda is None:
        rows.append(("CUDA", "not in this torch build"))
    else:
        seen = "available" if torch.cuda.is_available() else "no CUDA device visible"
        rows.append(("CUDA", f"{torch.version.cuda} (torch build); {seen}"))
    try:
        rows.append(("NCCL", ".".join(map(str, torch.cuda.nccl.version()))))
    except (AttributeError, RuntimeError):
        rows.append(("NCCL", "not in this torch build"))
    return rows


def gpus() -> list[tuple[str, str]]:
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    rows = [("GPUs", str(count)), ("CPU cores", str(os.cpu_count()))]
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        rows.append((f"  cuda:{i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB"))
    return rows


def module_version(name: str) -> str:
    """The version of the module this interpreter loads (torch's names its build, e.g. 2.11.0+cu130)."""
    try:
        return importlib.import_module(name).__version__
    except ImportError as err:
        return f"not importable ({err})"


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


def op_checks(engine: EngineConfig) -> list[Check]:
    """Build (or load from the extension cache) each DeepSpeed op a run with ``engine`` would load."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    checks = []
    for op in OPS:
        if not op.needed(engine, accelerator):
            continue
        name = f"DeepSpeed op {op.builder} ({op.why})"
        builder = get_accelerator().create_op_builder(op.builder)
        if builder is None:
            checks.append(Check(name, False, f"DeepSpeed's {accelerator} accelerator has no such op"))
            continue
        if not builder.is_compatible(verbose=False):
            checks.append(Check(name, False, f"{builder.NAME} is not compatible with this machine "
                                             f"(ds_report lists why)"))
            continue
        began = time.perf_counter()
        try:
            builder.load(verbose=False)
        except Exception as err:  # a compiler or linker failure: its last line says what is missing
            reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
            checks.append(Check(name, False, f"{builder.NAME} does not build: {reason}"))
            continue
        checks.append(Check(name, True, f"{builder.NAME} loads ({time.perf_counter() - began:.1f} s; built once, "
                                        f"then cached by torch)"))
    return checks


def launch_checks(cfg: LaunchConfig) -> list[Check]:
    """The hostfile, the rendezvous host's address, the GPUs and the commands launch.backend runs."""
    import torch

    checks, hosts = [], []
    if cfg.hostfile:
        try:
            hosts = read_hostfile(cfg.hostfile)
            check_hosts(cfg, tuple(hosts))
            checks.append(Check("launch.hostfile", True, ", ".join(f"{h.name} ({h.slots} slots)" for h in hosts)))
        except (HostfileError, ConfigError) as err:
            checks.append(Check("launch.hostfile", False, str(err)))
    master = cfg.master_addr or (hosts[0].name if hosts else None)
    if master:
        try:
            address = socket.getaddrinfo(master, cfg.master_port)[0][4][0]
            checks.append(Check("launch.master_addr", True, f"{master} is {address}"))
        except (OSError, UnicodeError) as err:  # UnicodeError: a name the IDNA codec refuses
            checks.append(Check("launch.master_addr", False, f"{master} does not resolve ({err})"))
    if torch.cuda.is_available() and cfg.procs_per_node > torch.cuda.device_count():
        checks.append(Check("launch.procs_per_node", False, f"{cfg.procs_per_node} processes but this machine "
                                                            f"sees {torch.cuda.device_count()} GPU(s)"))
    for tool, why in tools(cfg):
        path = shutil.which(tool)
        checks.append(Check(tool, path is not None, path or f"not on PATH; {why}"))
    return checks


def tools(cfg: LaunchConfig) -> list[tuple[str, str]]:
    """Commands the launcher runs on this machine, and what fails without each."""
    if cfg.backend == "slurm":
        return [("sbatch", "`polytrain launch --submit` cannot submit the script from this machine")]
    if cfg.backend == "deepspeed" and cfg.nodes > 1:
        return [("pdsh", "the deepspeed launcher starts the other nodes with it"),
                ("ssh", "pdsh reaches the other nodes with it")]
    return []
