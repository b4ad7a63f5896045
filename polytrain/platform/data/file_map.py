"""Read-only file maps that do not stay in a process's resident memory.

Every page of a mapped file that a process has read counts in its resident set until the mapping goes away,
and the kernel reads ahead around each one.  Sampling a large prepared split at random through plain maps
(numpy's ``memmap``, Arrow's ``memory_map``) therefore grows a rank's RSS with the data and with the steps
taken: at 100x the quick start's data, 10 steps left 98 MiB of shard and token pages resident against 6 MiB
at 1x.  A ``FileMap`` maps without read-ahead (``MADV_RANDOM``), and ``release`` drops the pages read so far
from the process (``MADV_DONTNEED``): they stay in the OS page cache, shared and evictable, and a view into the
map stays valid -- reading it again faults the page back in from the cache.  ``Opened`` keeps a reader's maps
and releases those it read every ``RELEASE_EVERY`` reads.
"""

import mmap
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Generic, Hashable, TypeVar

import numpy as np

ADVICE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_RANDOM") and hasattr(mmap, "MADV_DONTNEED")
"""Linux has both advices; elsewhere a map is a plain map."""


class FileMap:
    """One file mapped read-only, without read-ahead."""

    def __init__(self, path: Path):
        with open(path, "rb") as file:
            self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        if ADVICE:
            self.map.madvise(mmap.MADV_RANDOM)

    def __len__(self) -> int:
        return len(self.map)

    def array(self, dtype: np.dtype, count: int = -1, offset: int = 0) -> np.ndarray:
        """A read-only view of ``count`` values of ``dtype`` from byte ``offset`` (-1: to the end)."""
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=offset)

    def release(self) -> None:
        if ADVICE:
            self.map.madvise(mmap.MADV_DONTNEED)


def npy_array(path: Path) -> tuple[np.ndarray, FileMap]:
    """The array of a ``.npy`` file as a view into its ``FileMap`` (what ``np.load(mmap_mode="r")`` gives,
    without read-ahead); a file that is not a plain C-order ``.npy`` raises ``ValueError``."""
    with open(path, "rb") as file:
        major, _ = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(file)
        offset = file.tell()
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: not a C-order array of plain values")
    count = int(np.prod(shape))
    mapped = FileMap(path)
    if offset + count * dtype.itemsize > len(mapped):
        raise ValueError(f"{path}: {len(mapped)} bytes, too few for an array of shape {shape}")
    return mapped.array(dtype, count, offset).reshape(shape), mapped


RELEASE_EVERY = 32
"""Reads between two releases of their pages: what stays resident is bounded by that many reads' pages, and
each release's cost (the pages of the next reads fault in again) is shared by that many reads."""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Opened(Generic[K, V]):
    """What was opened by key, at most ``limit`` (the least recently used are dropped: file descriptors stay
    bounded), and which of them were read since their pages last left the process."""

    def __init__(self, limit: int, open_: Callable[[K], tuple[V, list[FileMap]]]):
        self.limit, self.open = limit, open_
        self.entries: OrderedDict[K, tuple[V, list[FileMap]]] = OrderedDict()
        self.read: set[FileMap] = set()
        self.reads = 0

    def __getitem__(self, key: K) -> V:
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self.open(key)
            if len(self.entries) > self.limit:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        self.read.update(entry[1])
        return entry[0]

    def release(self, every: int = RELEASE_EVERY) -> None:
        """One read is done: on every ``every``-th, drop the pages of every map read since from this process."""
        self.reads += 1
        if self.reads % every:
            return
        for mapped in self.read:
            mapped.release()
        self.read.clear()

    def __getstate__(self) -> dict:
        # What was opened stays in the process that opened it: a loader worker opens its own files.
        return {"limit": self.limit, "open": self.open}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["limit"], state["open"])
