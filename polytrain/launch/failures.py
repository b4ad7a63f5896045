"""A failed rank's error, carried from the training process to the launcher that started it.

When one of N processes dies, its error is buried in the interleaved output of
all of them, followed by the launcher's own report and the errors of the ranks
it then stopped.  So ``polytrain launch`` gives the processes it starts a
folder (``$POLYTRAIN_FAILURE_DIR``); a process that fails leaves its error
there (``rank<N>.json``), and the launcher names the first failure in one line.
"""

import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from polytrain import atomic
from polytrain.errors import PolytrainError

FAILURE_DIR = "POLYTRAIN_FAILURE_DIR"
MAX_MESSAGE = 1000
"""Characters of a rank's error kept in the launcher's one-line report (its full output is above it)."""


class LaunchError(PolytrainError):
    """A launched job could not start or stopped early; the message says where and why."""


class RankFailure(LaunchError):
    """A training process of a launched job failed; the message names the rank and its error."""


@dataclass(frozen=True)
class Failure:
    rank: int
    """Global rank of the failed process."""
    local_rank: int
    """Its index among its node's processes."""
    host: str
    """The machine it ran on."""
    pid: int
    error: str
    """``ExceptionType: message``, on one line."""
    time: float
    """When the process failed (seconds since the epoch); the earliest failure is the cause."""


def record_failure(err: BaseException) -> None:
    """In a process started by ``polytrain launch``: leave ``err`` for the launcher. Elsewhere: nothing."""
    folder = os.environ.get(FAILURE_DIR)
    if not folder or "RANK" not in os.environ:
        return
    text = " ".join(f"{type(err).__name__}: {err}".split())
    failure = Failure(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), socket.gethostname(),
                      os.getpid(), text[:MAX_MESSAGE], time.time())
    try:  # written atomically: the launcher never reads half a file
        atomic.write_text(Path(folder) / f"rank{failure.rank}.json", json.dumps(asdict(failure)))
    except OSError:  # the launcher is gone (its folder with it); the error itself is what must surface
        pass


def read_failures(folder: Path) -> dict[int, Failure]:
    """The failures recorded in ``folder``, by global rank."""
    failures = {}
    for path in folder.glob("rank*.json"):
        failure = Failure(**json.loads(path.read_text()))
        failures[failure.rank] = failure
    return failures


@contextmanager
def failure_folder() -> Iterator[Path]:
    """A fresh folder, named in ``$POLYTRAIN_FAILURE_DIR`` for the processes started inside the block."""
    previous = os.environ.get(FAILURE_DIR)
    with tempfile.TemporaryDirectory(prefix="polytrain-failures-") as folder:
        os.environ[FAILURE_DIR] = folder
        try:
            yield Path(folder)
        finally:
            if previous is None:
                os.environ.pop(FAILURE_DIR, None)
            else:
                os.environ[FAILURE_DIR] = previous


def first_failure_message(failure: Failure, failed_ranks: int, exit_code: int | None) -> str:
    """``rank 1 (local rank 1 on host, pid 123) failed first, exit code 2: DataError: ...``."""
    code = f", exit code {exit_code}" if exit_code is not None else ""
    others = f"; {failed_ranks - 1} other rank(s) failed after it" if failed_ranks > 1 else ""
    return (f"rank {failure.rank} (local rank {failure.local_rank} on {failure.host}, pid {failure.pid}) failed "
            f"first{code}: {failure.error}{others}; the launcher stopped the job")
