"""The slurm backend: an sbatch script whose every node runs torchrun (through ``polytrain launch``).

The script asks for ``launch.nodes`` nodes with one task each, sets up the
environment, takes the allocation's first node as the rendezvous host and runs
one ``srun`` task per node.  Each task is ``polytrain launch`` with
backend=torchrun, keyed by the SLURM job id: with a c10d rendezvous (the
default) no node needs its rank; with a static one each task adds its own
``$SLURM_NODEID`` (0 on the first node).  A node that never starts or a rank
that dies is reported as in any torchrun job, and ``--kill-on-bad-exit`` ends
the other nodes when one fails.

Ahead of the time limit (``launch.slurm.stop_before``) SLURM signals every
process of the job with SIGUSR1; the training processes agree on a step,
checkpoint it and exit with ``errors.STOPPED``, and the script then requeues
the job.  Requeued, it runs again under the same job id, so with the same run
directory (``train.run_name`` is named after the job id), and its processes
see ``$SLURM_RESTART_COUNT`` and resume from the newest checkpoint there.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from polytrain.atomic import unwritable
from polytrain.errors import STOPPED, ConfigError
from polytrain.launch.backends import Backend
from polytrain.launch.failures import LaunchError
from polytrain.platform.train.stopping import STOP_FILE

if TYPE_CHECKING:
    from polytrain.config.launch import LaunchConfig
    from polytrain.launch.job import Job

FIRST_NODE = ('NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))', "MASTER_ADDR=${NODES[0]}")
"""The rendezvous host: the allocation's first node (the one the script runs on). Not `scontrol ... | head -n 1`:
under pipefail, scontrol killed by SIGPIPE when head exits early would fail the job."""


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
    # one run directory per SLURM job, on every node and however often it is requeued
    run_name = shlex.quote(job.run_name) if job.run_name_given else f'"{job_name(job)}-$SLURM_JOB_ID"'
    rendezvous = [f"train.run_name={run_name}", "launch.backend=torchrun", f"launch.nodes={cfg.nodes}", f"launch.procs_per_node={cfg.procs_per_node}",
                  *([f"launch.max_restarts={cfg.max_restarts}"] if cfg.max_restarts else []),
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
               f"--output={output_path(job)}",
               *([f"--signal=USR1@{s.stop_before}", "--requeue", "--open-mode=append"] if s.stop_before else []),
               *s.sbatch_args]
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
             *([f"# A job stopped by SIGUSR1 ({s.stop_before} s before the time limit) or SIGTERM (preemption) saves a "
                "checkpoint,",
                f"# leaves {STOP_FILE} and exits with {STOPPED}: it is queued again and resumes from that checkpoint.",
                f"export {STOP_FILE}={shlex.quote(str(Path(job.out_dir).resolve()))}/.stopped-$SLURM_JOB_ID",
                'rm -f "$POLYTRAIN_STOP_FILE"', "status=0"] if s.stop_before else []),
             f"srun --nodes={job.cfg.nodes} --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
             f"    {node_command(job)}" + (" || status=$?" if s.stop_before else ""),
             *([f'if [ -f "${STOP_FILE}" ]; then', f'    rm -f "${STOP_FILE}"', '    scontrol requeue "$SLURM_JOB_ID"',
                "fi", 'exit "$status"'] if s.stop_before else []),
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
    for key, folder in (("launch.slurm.script", path.parent), ("train.out_dir", Path(job.out_dir))):
        reason = unwritable(folder)
        if reason:
            raise ConfigError(key, str(folder), f"the script and the job's log go there, but {reason}")
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


BACKEND = Backend(check, describe, run)
