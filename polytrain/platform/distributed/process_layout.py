"""How a job's processes divide the work: data-parallel replicas, each a group of sequence-parallel processes.

With ``engine.sequence_parallel: N`` the ``P`` processes form ``P / N`` groups of ``N`` consecutive ranks (one
node's GPUs, where the all-to-alls are cheapest): the ranks of a group read the same samples, each computing a
slice of every sequence; the groups read different samples.  Everything that deals samples to ranks (the data
order, budgets, the global batch) counts the groups: the data-parallel degree ``P / N``.  Torch-free, so
``polytrain launch`` checks and prints it before any process starts.
"""

from dataclasses import dataclass

from polytrain.errors import ConfigError


@dataclass(frozen=True)
class ProcessLayout:
    processes: int
    sequence: int = 1
    """engine.sequence_parallel."""

    def check(self, processes_are: str) -> None:
        """A one-line ``ConfigError`` unless ``sequence`` divides the processes; ``processes_are`` says where
        their count comes from (``launch.nodes 1 x launch.procs_per_node 4``)."""
        if self.processes % self.sequence:
            divisors = [n for n in range(1, self.processes + 1) if self.processes % n == 0]
            raise ConfigError("engine.sequence_parallel", self.sequence,
                              f"must divide the job's {self.processes} process(es) ({processes_are}); use one of "
                              f"{', '.join(map(str, divisors))}, or a job of a multiple of {self.sequence} processes")

    @property
    def data(self) -> int:
        """The data-parallel degree: groups reading distinct samples."""
        return self.processes // self.sequence

    def data_rank(self, rank: int) -> int:
        """The data-parallel rank (which group) of process ``rank``."""
        return rank // self.sequence

    def sequence_rank(self, rank: int) -> int:
        """Which slice of every sequence process ``rank`` computes."""
        return rank % self.sequence

    def sequence_groups(self) -> list[list[int]]:
        """The ranks of each sequence-parallel group, in data-parallel order."""
        return [list(range(g * self.sequence, (g + 1) * self.sequence)) for g in range(self.data)]

    def describe(self) -> str:
        """One line, e.g. ``4 processes = 2 data-parallel x 2 sequence-parallel; ranks sharing samples: [0, 1]
        [2, 3]``."""
        line = f"{self.processes} process(es) = {self.data} data-parallel x {self.sequence} sequence-parallel"
        if self.sequence == 1:
            return line + " (each process reads its own samples)"
        groups = self.sequence_groups()
        shown = " ".join(str(g) for g in groups[:4]) + (f" ... ({len(groups)} groups)" if len(groups) > 4 else "")
        return f"{line}; ranks sharing each sample: {shown}"
