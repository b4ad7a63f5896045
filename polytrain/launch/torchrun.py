"""The torchrun backend: ``python -m torch.distributed.run`` starts this node's training processes.

Run ``polytrain launch`` on every node.  torchrun itself runs inside this
process (``torch.distributed.run``, the code behind the ``torchrun`` command,
with exactly the arguments a dry run prints), so its failures arrive as
exceptions: a rendezvous that times out and a rank that dies are each reported
in one line instead of torchrun's traceback.
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from typing import TYPE_CHECKING

from polytrain.errors import ConfigError
from polytrain.launch.failures import RankFailure, failure_folder, first_failure_message, read_failures
from polytrain.launch.rendezvous import rendezvous_error, rendezvous_failures

if TYPE_CHECKING:
    from polytrain.launch.config import LaunchConfig
    from polytrain.launch.job import Job

log = logging.getLogger(__name__)

TORCHRUN = ("-m", "torch.distributed.run")


def check(cfg: LaunchConfig) -> None:
    if cfg.nodes > 1 and not cfg.master_addr and not cfg.hostfile:
        raise ConfigError("master_addr", cfg.master_addr, f"is required for nodes={cfg.nodes} with torchrun: the "
                          f"address of the node hosting the rendezvous, reachable from every node (or give "
                          f"launch.hostfile, whose first host it then is)")


def torchrun_args(job: Job, node_rank: int) -> list[str]:
    """torchrun's arguments on node ``node_rank``, the training command included."""
    cfg = job.cfg
    return [f"--nnodes={cfg.nodes}", f"--nproc-per-node={cfg.procs_per_node}",
            *cfg.rdzv.torchrun_args(job.master_addr, cfg.master_port, cfg.nodes, node_rank),
            "-m", "polytrain.cli", *job.train_args]


def describe(job: Job) -> str:
    """The exact command each node runs: one per node for static rendezvous, one for all with c10d."""
    cfg = job.cfg
    if cfg.rdzv.backend == "c10d":
        where = "this node" if cfg.nodes == 1 else (
            f"every node ({', '.join(h.name for h in job.hosts[:cfg.nodes]) or f'{cfg.nodes} nodes'}; their ranks "
            f"are assigned as they join)")
        return (f"# on {where}: {cfg.procs_per_node} process(es)\n"
                f"{shlex.join([sys.executable, *TORCHRUN, *torchrun_args(job, 0)])}")
    return "\n".join(f"# {job.node(node)}: {job.ranks(node)}\n"
                     f"{shlex.join([sys.executable, *TORCHRUN, *torchrun_args(job, node)])}"
                     for node in range(cfg.nodes))


def run(job: Job) -> None:
    """Start this node's processes and wait for them; raises ``LaunchError`` when the job fails."""
    from torch.distributed import run as torch_run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    cfg = job.cfg
    args = torchrun_args(job, cfg.node_rank)
    log.info("%s", shlex.join([sys.executable, *TORCHRUN, *args]))
    if cfg.nodes > 1:
        log.info("waiting for %d nodes at the %s rendezvous on %s:%d (launch.rdzv.timeout=%d s)", cfg.nodes,
                 cfg.rdzv.backend, job.master_addr, cfg.master_port, cfg.rdzv.timeout)
    started = time.monotonic()
    with failure_folder() as folder:
        try:
            torch_run.run(torch_run.parse_args(args))
        except ChildFailedError as err:
            raise rank_failure(err, read_failures(folder)) from None
        except rendezvous_failures() as err:
            raise rendezvous_error(cfg.rdzv, job.master_addr, cfg.master_port, cfg.nodes, cfg.node_rank, err,
                                   time.monotonic() - started) from None


def rank_failure(err, recorded: dict) -> RankFailure:
    """The first of the ranks torchrun saw fail that recorded an error (or, when none did, how the first died)."""
    failed = err.failures  # global rank -> torch's ProcessFailure (exit code or signal, pid, local rank)
    # A rank that recorded its error is the cause; the ones the launcher then stopped recorded none. (torch
    # stamps a failure in whole seconds, so comparing its stamp with a recorded time could pick a victim.)
    reporters = [rank for rank in failed if rank in recorded]
    first = (min(reporters, key=lambda rank: recorded[rank].time) if reporters else
             min(failed, key=lambda rank: failed[rank].timestamp))
    process = failed[first]
    if first in recorded:
        return RankFailure(first_failure_message(recorded[first], len(failed), process.exitcode))
    how = (f"was killed by {process.signal_name()}" if process.exitcode < 0 else
           f"exited with code {process.exitcode}")
    hint = " (SIGKILL often means the machine ran out of memory)" if process.signal_name() == "SIGKILL" else ""
    return RankFailure(f"rank {first} (local rank {process.local_rank}, pid {process.pid}) {how} without "
                       f"reporting an error{hint}; the launcher stopped the job")
