"""The ``launch`` section: how many nodes and processes, which launcher, how the nodes meet.

Only value checks live here (every process of a job loads the config, also on
nodes that lack the launching node's files); the hostfile is read when a job
is launched.
"""

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from polytrain.errors import ConfigError
from polytrain.schema import NonNegative, Range


@dataclass(frozen=True)
class RendezvousConfig:
    backend: Literal["c10d", "static"] = "c10d"
    """c10d: nodes join in any order and are numbered as they join (torchrun's recommended multi-node
    form). static: node k runs with launch.node_rank=k, as with `accelerate launch` (under SLURM: its
    $SLURM_NODEID), and rank 0 is on node 0."""
    id: str = "polytrain"
    """Job id every node passes to the rendezvous; jobs sharing master_addr:master_port need different ids
    (under SLURM: the job id)."""
    timeout: Annotated[int, Range(ge=1, le=10**7, unit="seconds")] = 600
    """Seconds a node waits for all launch.nodes nodes to arrive (or to reach node 0) before giving up."""

    def check(self) -> None:
        if not self.id or any(c.isspace() for c in self.id):
            raise ConfigError("id", self.id, "must be a non-empty word without spaces")

    def torchrun_args(self, master_addr: str, master_port: int, nodes: int, node_rank: int) -> list[str]:
        """torchrun's rendezvous options for this node."""
        if self.backend == "c10d" and nodes == 1:
            # A store on a free port: a busy master_port would otherwise make this node a client of
            # whatever store holds it (c10d falls back to joining when it cannot host).
            return ["--standalone"]
        if self.backend == "static":
            # The TCP store's timeout bounds both node 0's wait for the others and their wait for node 0.
            return [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}",
                    "--rdzv-backend=static", f"--rdzv-id={self.id}", f"--rdzv-conf=timeout={self.timeout}"]
        # join_timeout bounds the wait for all nodes; read_timeout the wait to reach the hosting node.
        return ["--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{master_port}", f"--rdzv-id={self.id}",
                f"--rdzv-conf=join_timeout={self.timeout},read_timeout={self.timeout}"]


TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}")
"""SLURM's time limit formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""


@dataclass(frozen=True)
class SlurmConfig:
    partition: str | None = None
    """sbatch --partition; null: the cluster's default."""
    account: str | None = None
    """sbatch --account to charge; null: the user's default."""
    time: str | int = "01:00:00"
    """Wall-clock limit (sbatch --time): M, M:S, H:M:S, D-H, D-H:M or D-H:M:S. Write hours with two digits
    (02:00:00): YAML reads an unquoted 2:00:00 as the number 7200."""
    gpus_per_node: Annotated[int, Range(ge=0, note="0: no GPUs) or null (procs_per_node")] | None = None
    """GPUs to request per node (sbatch --gpus-per-node); null: launch.procs_per_node; 0: a CPU-only job."""
    cpus_per_node: Annotated[int, Range(ge=1, note="or null: the default")] | None = None
    """CPU cores per node for its processes (sbatch --cpus-per-task of the one task per node); null: default."""
    job_name: str | None = None
    """sbatch --job-name; null: the recipe's file name."""
    output: str | None = None
    """sbatch --output, the job's log (%x: job name, %j: job id); null: <train.out_dir>/%x-%j.out."""
    env_setup: list[str] = field(default_factory=list)
    """Shell lines run before srun, e.g. `module load cuda/12.4`, `source .venv/bin/activate`; srun
    passes the resulting environment to every node."""
    sbatch_args: list[str] = field(default_factory=list)
    """Further sbatch options, one per #SBATCH line, e.g. `--qos=high`, `--exclusive`."""
    python: str | None = None
    """Python on the compute nodes; null: the interpreter running polytrain launch (a shared venv)."""
    script: str | None = None
    """Where to write the script; null: <train.out_dir>/<job name>.sbatch."""
    stop_before: Annotated[int, Range(ge=0, le=65535, unit="seconds", note="0: no signal, no requeue")] = 300
    """Seconds before the time limit SLURM sends SIGUSR1 to the job's processes (sbatch --signal=USR1@this; SLURM
    may send it up to 60 s earlier): they checkpoint and exit with code 75, and the script requeues the job, which
    resumes from that checkpoint. Leave a checkpoint's writing time, and more."""

    def check(self) -> None:
        if isinstance(self.time, int):
            raise ConfigError("time", self.time, "YAML read an unquoted time such as 30 or 2:00:00 as a number; "
                              "write it with a leading zero (02:00:00, 00:30) or in quotes")
        if not TIME.fullmatch(self.time):
            raise ConfigError("time", self.time, "must be a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
        if self.job_name is not None and (not self.job_name or any(c.isspace() for c in self.job_name)):
            raise ConfigError("job_name", self.job_name, "must be a non-empty word without spaces")
        for i, arg in enumerate(self.sbatch_args):
            if not arg.startswith("-") or "\n" in arg:
                raise ConfigError(f"sbatch_args.{i}", arg, "must be one sbatch option, e.g. --qos=high")
        for i, line in enumerate(self.env_setup):
            if "\n" in line:
                raise ConfigError(f"env_setup.{i}", line, "must be one shell line; give each line its own entry")


@dataclass(frozen=True)
class LaunchConfig:
    backend: str = "torchrun"
    """The launcher (see polytrain.launch.backends): torchrun starts this node's processes (run
    `polytrain launch` on every node); deepspeed starts every node of launch.hostfile over ssh from this
    one; slurm writes an sbatch script (--submit submits it) whose nodes each run torchrun."""
    nodes: Annotated[int, Range(ge=1)] = 1
    """Machines in the job."""
    procs_per_node: Annotated[int, Range(ge=1)] = 1
    """Training processes per machine: one per GPU; on CPU, at most the core count is sensible."""
    node_rank: NonNegative[int] = 0
    """torchrun with launch.rdzv.backend=static only: this machine's index among the nodes (0 hosts the
    rendezvous and rank 0). The slurm backend gives each node its $SLURM_NODEID instead."""
    master_addr: str | None = None
    """Address of the node that hosts the rendezvous, reachable from every node. null: the hostfile's first
    host, or 127.0.0.1 for one node (deepspeed: found over ssh; slurm: the allocation's first node)."""
    master_port: Annotated[int, Range(ge=1, le=65535, noun="a TCP port")] = 29500
    """TCP port of the rendezvous on master_addr (a one-node c10d job takes a free port instead)."""
    hostfile: str | None = None
    """DeepSpeed-format hostfile (`HOST slots=N` lines): the machines, in node order. Required by deepspeed
    for more than one node; with torchrun it names the nodes and supplies master_addr."""
    max_restarts: NonNegative[int] = 0
    """Times torchrun starts this node's processes again after one of them dies (torchrun --max-restarts; the
    torchrun and slurm backends); the restarted job resumes from its run's latest checkpoint by itself."""
    rdzv: RendezvousConfig = field(default_factory=RendezvousConfig)
    """How torchrun's nodes meet (torchrun and slurm backends)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """The sbatch script's resources and environment (slurm backend)."""

    def check(self) -> None:
        """Value checks; what each launcher allows is checked by the root config (``launch.backends``)."""
        if self.master_addr is not None and not is_reachable_name(self.master_addr):
            raise ConfigError("master_addr", self.master_addr, "must be a host name (letters, digits, '-', '_', "
                              "'.') or an IP address")
        if self.node_rank >= self.nodes:
            raise ConfigError("node_rank", self.node_rank, f"must be in [0, nodes={self.nodes})")
        if self.node_rank and (self.backend, self.rdzv.backend) != ("torchrun", "static"):
            raise ConfigError("node_rank", self.node_rank, f"is only used by torchrun's static rendezvous "
                              f"(launch.rdzv.backend=static); with backend={self.backend} and "
                              f"rdzv.backend={self.rdzv.backend} the launcher numbers the nodes itself")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
"""One dot-separated part of a host name: letters, digits, inner hyphens (RFC 1123) and underscores
(which DNS forbids but /etc/hosts and many clusters use)."""
MAX_HOST_NAME = 253


def is_reachable_name(name: str) -> bool:
    """A syntactically valid IP address or DNS host name (``user@host``, URLs and ``host:port`` are not)."""
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return len(name) <= MAX_HOST_NAME and all(LABEL.fullmatch(label) for label in name.split("."))
