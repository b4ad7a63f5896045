"""Start a job's processes with torchrun (``python -m torch.distributed.run``) on this node.

polytrain adds validation and a dry run; torchrun does the launching.
"""

import shlex
import subprocess
import sys
from dataclasses import dataclass

from polytrain.errors import ConfigError


@dataclass(frozen=True)
class LaunchConfig:
    nodes: int = 1
    """Machines in the job."""
    procs_per_node: int = 1
    """Training processes per machine (one per GPU; on CPU, at most the core count is sensible)."""
    node_rank: int = 0
    """This machine's index among ``nodes`` (0 hosts the rendezvous)."""
    master_addr: str = "127.0.0.1"
    """Address of node 0, reachable from every node."""
    master_port: int = 29500
    """TCP port on node 0 for the rendezvous."""

    def check(self) -> None:
        for name in ("nodes", "procs_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be >= 1")
        if not 0 <= self.node_rank < self.nodes:
            raise ConfigError("node_rank", self.node_rank, f"must be in [0, nodes={self.nodes})")
        if not 0 < self.master_port < 65536:
            raise ConfigError("master_port", self.master_port, "must be a TCP port in 1..65535")


def torchrun_command(cfg: LaunchConfig, config_path: str, overrides: list[str]) -> list[str]:
    """The command this node runs: torchrun starting ``polytrain train`` in each process."""
    return [sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={cfg.nodes}", f"--nproc_per_node={cfg.procs_per_node}", f"--node_rank={cfg.node_rank}",
            f"--master_addr={cfg.master_addr}", f"--master_port={cfg.master_port}",
            "-m", "polytrain.cli", "train", config_path, *overrides]


def launch(cfg: LaunchConfig, config_path: str, overrides: list[str], dry_run: bool) -> int:
    command = torchrun_command(cfg, config_path, overrides)
    print(shlex.join(command), flush=True)
    if dry_run:
        return 0
    return subprocess.call(command)
