"""The ``launch`` section: how many nodes and processes, which launcher, how the nodes meet.

Only value checks live here (every process of a job loads the config, also on
nodes that lack the launching node's files); the hostfile is read when a job
is launched.
"""

from dataclasses import dataclass, field

from polytrain.errors import ConfigError
from polytrain.launch.hostfile import is_reachable_name
from polytrain.launch.rendezvous import RendezvousConfig
from polytrain.launch.slurm import SlurmConfig


@dataclass(frozen=True)
class LaunchConfig:
    backend: str = "torchrun"
    """The launcher (see polytrain.launch.backends): torchrun starts this node's processes (run
    `polytrain launch` on every node); deepspeed starts every node of launch.hostfile over ssh from this
    one; slurm writes an sbatch script (--submit submits it) whose nodes each run torchrun."""
    nodes: int = 1
    """Machines in the job."""
    procs_per_node: int = 1
    """Training processes per machine: one per GPU; on CPU, at most the core count is sensible."""
    node_rank: int = 0
    """torchrun with launch.rdzv.backend=static only: this machine's index among the nodes (0 hosts the
    rendezvous and rank 0). The slurm backend gives each node its $SLURM_NODEID instead."""
    master_addr: str | None = None
    """Address of the node that hosts the rendezvous, reachable from every node. null: the hostfile's first
    host, or 127.0.0.1 for one node (deepspeed: found over ssh; slurm: the allocation's first node)."""
    master_port: int = 29500
    """TCP port of the rendezvous on master_addr (a one-node c10d job takes a free port instead)."""
    hostfile: str | None = None
    """DeepSpeed-format hostfile (`HOST slots=N` lines): the machines, in node order. Required by deepspeed
    for more than one node; with torchrun it names the nodes and supplies master_addr."""
    rdzv: RendezvousConfig = field(default_factory=RendezvousConfig)
    """How torchrun's nodes meet (torchrun and slurm backends)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """The sbatch script's resources and environment (slurm backend)."""

    def check(self) -> None:
        from polytrain.launch.backends import BACKENDS  # the backends import this module

        if self.backend not in BACKENDS:
            raise ConfigError("backend", self.backend, f"unknown launcher; known: {', '.join(BACKENDS.names())}")
        for name in ("nodes", "procs_per_node"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be >= 1")
        if self.master_addr is not None and not is_reachable_name(self.master_addr):
            raise ConfigError("master_addr", self.master_addr, "must be a host name (letters, digits, '-', '_', "
                              "'.') or an IP address")
        if not 0 < self.master_port < 65536:
            raise ConfigError("master_port", self.master_port, "must be a TCP port in 1..65535")
        if not 0 <= self.node_rank < self.nodes:
            raise ConfigError("node_rank", self.node_rank, f"must be in [0, nodes={self.nodes})")
        if self.node_rank and (self.backend, self.rdzv.backend) != ("torchrun", "static"):
            raise ConfigError("node_rank", self.node_rank, f"is only used by torchrun's static rendezvous "
                              f"(launch.rdzv.backend=static); with backend={self.backend} and "
                              f"rdzv.backend={self.rdzv.backend} the launcher numbers the nodes itself")
        BACKENDS.get(self.backend).check(self)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node
