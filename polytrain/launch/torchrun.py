"""The torchrun backend: ``python -m torch.distributed.run`` starts this node's training processes.

Run ``polytrain launch`` on every node.  torchrun itself runs inside this
process (``torch.distributed.run``, the code behind the ``torchrun`` command,
with exactly the arguments a dry run prints), so its failures arrive as
exceptions: a rendezvous that times out and a rank that dies are each reported
in one line instead of torchrun's traceback.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

from polytrain.errors import STOPPED, ConfigError, Stopped
from polytrain.launch.backends import Backend
from polytrain.launch.failures import (
    Failure,
    LaunchError,
    RankFailure,
    failure_folder,
    first_failure_message,
    read_failures,
)
from polytrain.launch.rendezvous import rendezvous_error, rendezvous_failures
from polytrain.platform.train.stopping import LAUNCHER_PID, SIGNALS

if TYPE_CHECKING:
    from polytrain.config.launch import LaunchConfig
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
            *([f"--max-restarts={cfg.max_restarts}"] if cfg.max_restarts else []),
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
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    cfg = job.cfg
    args = torchrun_args(job, cfg.node_rank)
    log.info("%s", shlex.join([sys.executable, *TORCHRUN, *args]))
    if cfg.nodes > 1:
        log.info("waiting for %d nodes at the %s rendezvous on %s:%d (launch.rdzv.timeout=%d s)", cfg.nodes,
                 cfg.rdzv.backend, job.master_addr, cfg.master_port, cfg.rdzv.timeout)
    started = time.monotonic()
    with failure_folder() as folder, forwarded_stops() as stop:
        try:
            torch_run.run(torch_run.parse_args(args))
        except SignalException as err:
            raise stop_outcome(stop, err.sigval, read_failures(folder)) from None
        except ChildFailedError as err:
            raise rank_failure(err, read_failures(folder)) from None
        except rendezvous_failures() as err:
            raise rendezvous_error(cfg.rdzv, job.master_addr, cfg.master_port, cfg.nodes, cfg.node_rank, err,
                                   time.monotonic() - started) from None


@dataclass
class Stop:
    """A stop signal this launcher passed on to its training processes, and how they exited (by pid)."""

    signal: signal.Signals | None = None
    exit_codes: dict[int, int] = field(default_factory=dict)


@contextmanager
def forwarded_stops() -> Iterator[Stop]:
    """While torchrun runs in this process, SIGTERM and SIGUSR1 (from the scheduler, or from a training process that
    stops on one) are passed on to every training process; this process then waits until they have checkpointed
    and exited, and ends torchrun's agent the way torchrun's own signal handling does, so that it restarts nothing
    (``launch.max_restarts`` is for processes that died). The wait leaves the processes for torchrun to reap."""
    import psutil
    from torch.distributed.elastic.multiprocessing import SignalException

    stop = Stop()

    def forward(signum: int, frame) -> None:
        if stop.signal is not None:  # another one while passing the first on (each stopping process tells)
            return
        stop.signal = signal.Signals(signum)
        workers = psutil.Process().children()
        for worker in workers:
            try:
                worker.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
        for worker in workers:
            try:
                info = os.waitid(os.P_PID, worker.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:  # torchrun reaped it already
                continue
            stop.exit_codes[worker.pid] = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        raise SignalException(f"polytrain launch passed on {stop.signal.name}", stop.signal)

    saved = {name: os.environ.get(name) for name in (TORCHELASTIC_SIGNALS, LAUNCHER_PID)}
    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    os.environ[TORCHELASTIC_SIGNALS] = ",".join(s.name for s in TORCHRUN_SIGNALS)  # the others stay torchrun's
    os.environ[LAUNCHER_PID] = str(os.getpid())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


TORCHELASTIC_SIGNALS = "TORCHELASTIC_SIGNALS_TO_HANDLE"
TORCHRUN_SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
"""The signals torchrun's agent still handles itself: it ends the training processes at once."""


def stop_outcome(stop: Stop, sig: signal.Signals, recorded: dict[int, Failure]) -> Exception:
    """What a launch that got ``sig`` ends with: ``Stopped`` when the training processes all stopped with their
    checkpoint, else one line saying what happened."""
    if stop.signal is None:
        return LaunchError(f"polytrain launch got {sig.name}: torchrun ended the training processes")
    codes = sorted(set(stop.exit_codes.values()))
    if codes == [STOPPED]:
        return Stopped(stopped_message(recorded))
    failures = [f for f in recorded.values() if not f.error.startswith(Stopped.__name__)]
    first = f"; rank {failures[0].rank} reported {failures[0].error}" if failures else ""
    return LaunchError(f"polytrain launch passed {stop.signal.name} on to the training processes, but they exited "
                       f"with codes {codes}, not all {STOPPED} (stopped with a checkpoint){first}")


def stopped_message(recorded: dict[int, Failure]) -> str:
    """The line the first rank's stop left (they all name the same step and checkpoint)."""
    first = recorded[min(recorded)] if recorded else None
    return first.error.removeprefix(f"{Stopped.__name__}: ") if first else "stopped on a signal"


def rank_failure(err, recorded: dict) -> RankFailure | Stopped:
    """The first of the ranks torchrun saw fail that recorded an error (or, when none did, how the first died);
    ranks that all stopped on a signal with their checkpoint are ``Stopped``."""
    failed = err.failures  # global rank -> torch's ProcessFailure (exit code or signal, pid, local rank)
    if all(process.exitcode == STOPPED for process in failed.values()):
        return Stopped(stopped_message(recorded))
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


BACKEND = Backend(check, describe, run)
