"""The slurm backend: an sbatch script whose every node runs torchrun (through ``polytrain launch``).

The script asks for ``launch.nodes`` nodes with one task each, sets up the
environment, takes the allocation's first node as the rendezvous host and runs
one ``srun`` task per node.  Each task is ``polytrain launch`` with
backend=torchrun, keyed by the SLURM job id: with a c10d rendezvous (the
default) no node needs its rank; with a static one each task adds its own
``$SLURM_NODEID`` (0 on the first node).  A node that never starts or a rank
that dies is reported as in any torchrun job, and ``--kill-on-bad-exit`` ends
the other nodes when one fails.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from polytrain.errors import ConfigError
from polytrain.launch.failures import LaunchError

if TYPE_CHECKING:
    from polytrain.launch.config import LaunchConfig
    from polytrain.launch.job import Job

TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d+(:\d{1,2}){0,2}")
"""SLURM's time limit formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
FIRST_NODE = ('NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))', "MASTER_ADDR=${NODES[0]}")
"""The rendezvous host: the allocation's first node (the one the script runs on). Not `scontrol ... | head -n 1`:
under pipefail, scontrol killed by SIGPIPE when head exits early would fail the job."""


@dataclass(frozen=True)
class SlurmConfig:
    partition: str | None = None
    """sbatch --partition; null: the cluster's default."""
    account: str | None = None
    """sbatch --account to charge; null: the user's default."""
    time: str | int = "01:00:00"
    """Wall-clock limit (sbatch --time): M, M:S, H:M:S, D-H, D-H:M or D-H:M:S. Write hours with two digits
    (02:00:00): YAML reads an unquoted 2:00:00 as the number 7200."""
    gpus_per_node: int | None = None
    """GPUs to request per node (sbatch --gpus-per-node); null: launch.procs_per_node; 0: a CPU-only job."""
    cpus_per_node: int | None = None
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

    def check(self) -> None:
        if isinstance(self.time, int):
            raise ConfigError("time", self.time, "YAML read an unquoted time such as 30 or 2:00:00 as a number; "
                              "write it with a leading zero (02:00:00, 00:30) or in quotes")
        if not TIME.fullmatch(self.time):
            raise ConfigError("time", self.time, "must be a SLURM time limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise ConfigError("gpus_per_node", self.gpus_per_node, "must be >= 0 (0: no GPUs) or null")
        if self.cpus_per_node is not None and self.cpus_per_node < 1:
            raise ConfigError("cpus_per_node", self.cpus_per_node, "must be >= 1 or null")
        if self.job_name is not None and (not self.job_name or any(c.isspace() for c in self.job_name)):
            raise ConfigError("job_name", self.job_name, "must be a non-empty word without spaces")
        for i, arg in enumerate(self.sbatch_args):
            if not arg.startswith("-") or "\n" in arg:
                raise ConfigError(f"sbatch_args.{i}", arg, "must be one sbatch option, e.g. --qos=high")
        for i, line in enumerate(self.env_setup):
            if "\n" in line:
                raise ConfigError(f"env_setup.{i}", line, "must be one shell line; give each line its own entry")


def check(cfg: LaunchConfig) -> None:
    """Settings SLURM decides itself cannot also be given."""
    if cfg.hostfile:
        raise ConfigError("hostfile", cfg.hostfile, "cannot be used with backend=slurm: SLURM allocates the nodes")
    if cfg.master_addr:
        raise ConfigError("master_addr", cfg.master_addr, "cannot be used with backend=slurm: the allocation's "
                          "first node hosts the rendezvous")


NODE_RANK = """bash -c 'exec "$@" launch.node_rank="$SLURM_NODEID"' node"""
"""Runs the command after it with the task's own node rank appended: $SLURM_NODEID differs per node, so the
batch script cannot expand it; every other variable it can."""


def node_command(job: Job) -> str:
    """The command ``srun`` runs on every node; it reads $MASTER_ADDR, $SLURM_JOB_ID (and $SLURM_NODEID)."""
    cfg = job.cfg
    python = cfg.slurm.python or sys.executable
    train = [python, "-m", "polytrain.cli", "launch", str(Path(job.config_path).resolve()),
             *(o for o in job.overrides if not o.startswith("launch."))]
    rendezvous = ["launch.backend=torchrun", f"launch.nodes={cfg.nodes}", f"launch.procs_per_node={cfg.procs_per_node}",
                  f"launch.rdzv.backend={cfg.rdzv.backend}", 'launch.rdzv.id="slurm-$SLURM_JOB_ID"',
                  f"launch.rdzv.timeout={cfg.rdzv.timeout}", 'launch.master_addr="$MASTER_ADDR"',
                  f"launch.master_port={cfg.master_port}"]
    command = f"{shlex.join(train)} \\\n    {' '.join(rendezvous)}"
    return f"{NODE_RANK} \\\n    {command}" if cfg.rdzv.backend == "static" else command


def script(job: Job) -> str:
    """The sbatch script for ``job``."""
    s = job.cfg.slurm
    gpus = job.cfg.procs_per_node if s.gpus_per_node is None else s.gpus_per_node
    options = [f"--job-name={job_name(job)}", f"--nodes={job.cfg.nodes}", "--ntasks-per-node=1",
               *([f"--gpus-per-node={gpus}"] if gpus else []),
               *([f"--cpus-per-task={s.cpus_per_node}"] if s.cpus_per_node else []),
               f"--time={s.time}",
               *([f"--partition={s.partition}"] if s.partition else []),
               *([f"--account={s.account}"] if s.account else []),
               f"--output={output_path(job)}", *s.sbatch_args]
    lines = ["#!/bin/bash",
             f"# Written by: polytrain launch {shlex.join([job.config_path, *job.overrides])}",
             *(f"#SBATCH {option}" for option in options),
             "set -eo pipefail",
             "",
             *(["# launch.slurm.env_setup", *s.env_setup, ""] if s.env_setup else []),
             f"cd {shlex.quote(str(Path.cwd()))}",
             f"# The nodes meet ({job.cfg.rdzv.backend} rendezvous) on the allocation's first node.",
             *FIRST_NODE,
             "",
             f"# One task per node: polytrain launch starts torchrun there, which starts "
             f"{job.cfg.procs_per_node} training process(es).",
             f"srun --nodes={job.cfg.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
             f"    {node_command(job)}",
             ""]
    return "\n".join(lines)


def job_name(job: Job) -> str:
    return job.cfg.slurm.job_name or job.name


def output_path(job: Job) -> str:
    return job.cfg.slurm.output or str(Path(job.out_dir).resolve() / "%x-%j.out")


def script_path(job: Job) -> Path:
    return Path(job.cfg.slurm.script or Path(job.out_dir) / f"{job_name(job)}.sbatch")


def describe(job: Job) -> str:
    return script(job)


def run(job: Job) -> None:
    """Write the script; with --submit, hand it to sbatch."""
    path = script_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)
    Path(job.out_dir).mkdir(parents=True, exist_ok=True)  # sbatch does not create the log's folder
    path.write_text(script(job))
    if not job.submit:
        print(f"wrote {path}; submit it with: sbatch {path}  (or run polytrain launch again with --submit)",
              flush=True)
        return
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError(f"--submit: sbatch is not on PATH, so this machine cannot submit SLURM jobs; the script "
                          f"is written to {path}: submit it with `sbatch {path}` on a SLURM login node")
    done = subprocess.run([sbatch, "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise LaunchError(f"sbatch {path} failed with exit code {done.returncode}: {reason}")
    job_id = done.stdout.strip().split(";")[0]  # --parsable prints "id" or "id;cluster"
    log = output_path(job).replace("%x", job_name(job)).replace("%j", job_id)
    print(f"submitted SLURM job {job_id}: {path}; log: {log}", flush=True)
