"""One ``polytrain launch``: the launch settings, the hosts, and the command every training process runs."""

from dataclasses import dataclass
from pathlib import Path

from polytrain.config.launch import LaunchConfig
from polytrain.errors import ConfigError
from polytrain.launch.hostfile import Host, HostfileError, read_hostfile
from polytrain.platform.observe.run_dir import new_run_name

PER_NODE_KEYS = ("launch.node_rank=",)
"""Overrides that differ between nodes; the training command leaves them out so it is the same everywhere."""


@dataclass(frozen=True)
class Job:
    cfg: LaunchConfig
    config_path: str
    """The recipe, as given on the command line."""
    overrides: tuple[str, ...]
    """``section.key=value`` overrides, as given on the command line."""
    name: str
    """The job's name: the recipe's file name without suffix."""
    out_dir: str
    """train.out_dir: run directories (and SLURM scripts and logs) go under it."""
    run_name: str
    """train.run_name, fixed here when the config leaves it unset, so every process and every restart of the job
    writes (and resumes) the same run directory."""
    run_name_given: bool
    """The config set train.run_name (else a SLURM job names its run after its job id)."""
    hosts: tuple[Host, ...] = ()
    """The hostfile's hosts (empty without one); node k runs on hosts[k]."""
    submit: bool = False
    """slurm: submit the written script with sbatch."""

    @classmethod
    def create(cls, cfg: LaunchConfig, config_path: str, overrides: list[str], out_dir: str, run_name: str | None,
               submit: bool = False) -> "Job":
        """The job, with the hostfile read and checked against launch.nodes and launch.procs_per_node."""
        hosts = tuple(read_hostfile(cfg.hostfile)) if cfg.hostfile else ()
        if hosts:
            check_hosts(cfg, hosts)
        name = Path(config_path).stem
        return cls(cfg, str(config_path), tuple(overrides), name, out_dir, run_name or new_run_name(name),
                   run_name is not None, hosts, submit)

    @property
    def job_overrides(self) -> list[str]:
        """The overrides every process of the job gets: the given ones, the run's name first."""
        return [f"train.run_name={self.run_name}", *(o for o in self.overrides if not o.startswith(PER_NODE_KEYS))]

    @property
    def train_args(self) -> list[str]:
        """What each training process runs after ``python -m polytrain.cli``: the same on every node."""
        return ["train", self.config_path, *self.job_overrides]

    @property
    def master_addr(self) -> str | None:
        """Where the rendezvous is hosted: launch.master_addr, else the first host, else this machine for one node."""
        if self.cfg.master_addr:
            return self.cfg.master_addr
        if self.hosts:
            return self.hosts[0].name
        return "127.0.0.1" if self.cfg.nodes == 1 else None

    def node(self, node: int) -> str:
        """``node 1`` or, with a hostfile, ``node 1 (worker-1)``, for messages."""
        return f"node {node} ({self.hosts[node].name})" if self.hosts else f"node {node}"

    def ranks(self, node: int) -> str:
        """The global ranks node ``node`` runs (nodes in order, as static rendezvous and DeepSpeed number them)."""
        first = node * self.cfg.procs_per_node
        return f"rank {first}" if self.cfg.procs_per_node == 1 else f"ranks {first}-{first + self.cfg.procs_per_node - 1}"


def check_hosts(cfg: LaunchConfig, hosts: tuple[Host, ...]) -> None:
    if cfg.nodes > len(hosts):
        raise ConfigError("launch.nodes", cfg.nodes, f"the hostfile {cfg.hostfile} lists only {len(hosts)} host(s)")
    for host in hosts[:cfg.nodes]:
        if host.slots < cfg.procs_per_node:
            raise HostfileError(f"{host.where}: {host.name} has slots={host.slots}, fewer than "
                                f"launch.procs_per_node={cfg.procs_per_node}")
