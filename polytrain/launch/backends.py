"""The launchers ``launch.backend`` names, and ``launch()``, which hands a job to one of them.

Each launcher is a ``Backend``: its own config checks, the exact commands (or
script) a dry run prints, and how it runs.  Installed packages may add one under
the entry-point group ``polytrain.launchers`` (an object with the same three members).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from polytrain.errors import ConfigError
from polytrain.launch import deepspeed, slurm, torchrun
from polytrain.launch.config import LaunchConfig
from polytrain.launch.job import Job
from polytrain.platform.distributed.layout import Layout
from polytrain.registry import Registry


@dataclass(frozen=True)
class Backend:
    check: Callable[[LaunchConfig], None]
    """Raise ``ConfigError`` for launch settings this launcher cannot honour (pure: reads no files)."""
    describe: Callable[[Job], str]
    """The exact commands, or the script, the job's nodes would run (``--dry-run``)."""
    run: Callable[[Job], None]
    """Start the job and wait for it (slurm: write the script, submit it with ``--submit``);
    raise ``LaunchError`` when it fails."""


BACKENDS: Registry[Backend] = Registry("launch backend", group="polytrain.launchers")
for _name, _module in (("torchrun", torchrun), ("deepspeed", deepspeed), ("slurm", slurm)):
    BACKENDS.register(_name)(Backend(_module.check, _module.describe, _module.run))


def launch(cfg: LaunchConfig, out_dir: str, run_name: str | None, config_path: str, overrides: list[str],
           dry_run: bool = False, submit: bool = False, sequence_parallel: int = 1) -> int:
    """``polytrain launch``: print the job's commands (dry run) or start it; ``out_dir`` and ``run_name`` are
    train.out_dir and train.run_name, ``sequence_parallel`` engine.sequence_parallel (checked against the job's
    processes before any starts)."""
    if submit and cfg.backend != "slurm":
        raise ConfigError("--submit", True, f"submits SLURM jobs; launch.backend={cfg.backend!r} "
                          f"(set launch.backend=slurm)")
    if submit and dry_run:
        raise ConfigError("--submit", True, "cannot be combined with --dry-run, which starts nothing")
    layout = Layout(cfg.world_size, sequence_parallel)
    layout.check(f"launch.nodes {cfg.nodes} x launch.procs_per_node {cfg.procs_per_node}")
    job = Job.create(cfg, config_path, overrides, out_dir, run_name, submit)
    backend = BACKENDS.get(cfg.backend)
    # stderr: stdout stays exactly the commands (or the script) the nodes run
    print(f"polytrain launch: layout: {layout.describe()}", file=sys.stderr, flush=True)
    if dry_run:
        print(backend.describe(job), flush=True)
        return 0
    backend.run(job)
    return 0
