"""Stopping early when the scheduler says so: SIGTERM or SIGUSR1 make a run checkpoint and exit with ``STOPPED``.

SLURM sends SIGUSR1 ahead of a time limit (``launch.slurm.stop_before``) and
SIGTERM when it preempts or reaches the limit; Kubernetes sends SIGTERM before
it kills a pod.  A signal only sets a flag here: the step under way finishes,
and the flag travels in the all-reduce every step makes anyway (``Stepper``),
so every rank learns it at the same step, however far apart the signal reached
them.  The job then writes a checkpoint there, and each process exits with
``errors.STOPPED`` (75); a requeued or restarted job resumes from it by itself
(``trainer.restart_point``).  A process started by ``polytrain launch`` also
tells its launcher, which would otherwise take the exits for failures and
restart the job (``launch.max_restarts``).
"""

import os
import signal
from pathlib import Path
from types import FrameType

from polytrain import atomic

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_PID = "POLYTRAIN_LAUNCHER_PID"
"""Set by ``polytrain launch`` for the processes it starts: the process to tell when they stop on a signal."""
STOP_FILE = "POLYTRAIN_STOP_FILE"
"""Set by a script that acts on a stop (the SLURM script requeues the job): the file the main process writes once
every rank has stopped with its checkpoint. An exit code alone cannot say it: SLURM ends the other nodes when one
node's processes exit (``--kill-on-bad-exit``), and srun reports the highest code of them all."""


class StopSignals:
    """While installed, remembers the first stop signal this process got."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self.previous = {sig: signal.signal(sig, self.receive) for sig in SIGNALS}

    def receive(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signal.Signals(signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def leave_stop_file(message: str) -> None:
    """On the main process, after the stop's checkpoint: the file ``$POLYTRAIN_STOP_FILE`` names, if set."""
    path = os.environ.get(STOP_FILE)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(Path(path), message + "\n")


def tell_launcher() -> None:
    """Pass the stop on to the ``polytrain launch`` that started this process, if one did (as SIGUSR1)."""
    pid = os.environ.get(LAUNCHER_PID)
    if pid:
        try:
            os.kill(int(pid), signal.SIGUSR1)
        except ProcessLookupError:  # the launcher is gone; the stop goes on without it
            pass
