"""The deepspeed backend: DeepSpeed's own launcher starts every node of the hostfile from this one.

For more than one node DeepSpeed reaches the others over ssh (pdsh by default),
so passwordless ssh between the hosts is needed; each node then runs
``deepspeed.launcher.launch``, which starts its processes.  On one node no
hostfile is needed.  polytrain only builds and checks the command.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from typing import TYPE_CHECKING

from polytrain.errors import ConfigError
from polytrain.launch.backends import Backend
from polytrain.launch.failures import LaunchError, RankFailure, failure_folder, first_failure_message, read_failures

if TYPE_CHECKING:
    from polytrain.config.launch import LaunchConfig
    from polytrain.launch.job import Job

RUNNER = ("-m", "deepspeed.launcher.runner")
"""The module behind the ``deepspeed`` command."""


def check(cfg: LaunchConfig) -> None:
    if cfg.max_restarts:
        raise ConfigError("max_restarts", cfg.max_restarts, "is torchrun's: the deepspeed launcher restarts nothing; "
                          "use launch.backend=torchrun or slurm")
    if cfg.nodes > 1 and not cfg.hostfile:
        raise ConfigError("hostfile", cfg.hostfile, f"is required for nodes={cfg.nodes} with backend=deepspeed: "
                          f"the deepspeed launcher reaches the other nodes over ssh through the hosts it lists")


def command(job: Job) -> list[str]:
    cfg = job.cfg
    hostfile = [f"--hostfile={cfg.hostfile}"] if cfg.hostfile else []
    master = [f"--master_addr={job.cfg.master_addr}"] if job.cfg.master_addr else []
    # --num_gpus, not --include: it also counts processes on CPU-only machines. --no_local_rank: the
    # processes read LOCAL_RANK from the environment instead of a --local_rank argument.
    return [sys.executable, *RUNNER, *hostfile, f"--num_nodes={cfg.nodes}", f"--num_gpus={cfg.procs_per_node}",
            *master, f"--master_port={cfg.master_port}", "--no_local_rank", "--module", "polytrain.cli",
            *job.train_args]


def describe(job: Job) -> str:
    """The one command to run on the first host, and which ranks each host gets."""
    nodes = [f"# {job.node(n)}: {job.ranks(n)}" for n in range(job.cfg.nodes)]
    how = "# DeepSpeed starts these nodes over ssh/pdsh" if job.cfg.nodes > 1 else "# this machine"
    return "\n".join([how, *nodes, shlex.join(command(job))])


def run(job: Job) -> None:
    with failure_folder() as folder:
        code = subprocess.call(command(job))
        recorded = read_failures(folder)
    if code == 0:
        return
    if recorded:  # the processes of this node; DeepSpeed stops the others when one fails
        first = min(recorded.values(), key=lambda failure: failure.time)
        raise RankFailure(first_failure_message(first, len(recorded), None))
    raise LaunchError(f"the deepspeed launcher exited with code {code} and no rank on this node reported an "
                      f"error; see its output above")


BACKEND = Backend(check, describe, run)
