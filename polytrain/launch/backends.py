"""The launchers ``launch.backend`` names, and ``launch()``, which hands a job to one of them.

Each launcher is a ``Backend``: its own config checks, the exact commands (or
script) a dry run prints, and how it runs.  Installed packages may add one under
the entry-point group ``polytrain.launchers`` (an object with the same three members).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from polytrain.config.launch import LaunchConfig
from polytrain.config.registries import BACKENDS
from polytrain.errors import ConfigError
from polytrain.launch.job import Job


@dataclass(frozen=True)
class Backend:
    check: Callable[[LaunchConfig], None]
    """Raise ``ConfigError`` for launch settings this launcher cannot honour (pure: reads no files)."""
    describe: Callable[[Job], str]
    """The exact commands, or the script, the job's nodes would run (``--dry-run``)."""
    run: Callable[[Job], None]
    """Start the job and wait for it (slurm: write the script, submit it with ``--submit``);
    raise ``LaunchError`` when it fails."""


def launch(job, config_path: str, overrides: list[str], dry_run: bool = False, submit: bool = False) -> int:
    """``polytrain launch``: print the commands of ``job`` (a ``polytrain.job.Job``, resolved from ``config_path``
    and ``overrides``) for a dry run, or start it."""
    cfg = job.cfg.launch
    if submit and cfg.backend != "slurm":
        raise ConfigError("--submit", True, f"submits SLURM jobs; launch.backend={cfg.backend!r} "
                          f"(set launch.backend=slurm)")
    if submit and dry_run:
        raise ConfigError("--submit", True, "cannot be combined with --dry-run, which starts nothing")
    backend = BACKENDS.get(cfg.backend)
    try:
        backend.check(cfg)
    except ConfigError as err:
        raise err.under("launch") from None
    nodes = Job.create(cfg, config_path, overrides, job.cfg.train.out_dir, job.cfg.train.run_name, submit)
    if dry_run:
        print(backend.describe(nodes), flush=True)
        return 0
    backend.run(nodes)
    return 0
