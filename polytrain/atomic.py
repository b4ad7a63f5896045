"""Files and folders that are never seen half-written: written under a temporary name beside the target,
then renamed into place (a rename within one filesystem is atomic).

A reader, another process, or a run resumed after a crash sees the old
version or the new one, never a mix.  A write that fails removes its
temporary file, so a full disk leaves no debris beside what it could not
replace.  Temporary names are ``.tmp-<name>`` (plus ``-<pid>`` of the writer
when several processes may write the same target at once).
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` could not be created or written into (its nearest existing ancestor decides), or None."""
    folder = Path(folder).absolute()
    for existing in (folder, *folder.parents):
        if existing.exists():
            if not existing.is_dir():
                return f"{existing} is a file, not a folder"
            if not os.access(existing, os.W_OK | os.X_OK):
                return f"{existing} is not writable by this user"
            return None
    return None


def temporary(path: Path, private: bool = True) -> Path:
    """The temporary name a write of ``path`` goes to first; ``private`` adds this process's pid, so
    concurrent writers of the same target do not share it (a folder all ranks fill is not private)."""
    return path.with_name(f".tmp-{path.name}" + (f"-{os.getpid()}" if private else ""))


def write(path: Path, produce: Callable[[Path], object]) -> Path:
    """``produce(tmp)`` writes the file at a temporary path, which then replaces ``path``."""
    tmp = temporary(path)
    try:
        produce(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def publish(tmp: Path, final: Path, replace: bool = True) -> bool:
    """Rename the finished folder ``tmp`` to ``final``. If ``final`` exists it is replaced, or, with
    ``replace=False`` (a build another process may have finished first, identically), kept and ``tmp``
    dropped. Returns whether ``tmp`` became ``final``."""
    if final.exists():
        if not replace:
            shutil.rmtree(tmp)
            return False
        shutil.rmtree(final)
    try:
        tmp.rename(final)
    except OSError:
        if replace or not final.exists():
            raise
        shutil.rmtree(tmp)  # a concurrent builder renamed its copy in between
        return False
    return True


@contextmanager
def folder(final: Path, replace: bool = True) -> Iterator[Path]:
    """A fresh private temporary folder to fill; published as ``final`` when the block ends without error,
    removed when it raises."""
    tmp = temporary(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, final, replace)
