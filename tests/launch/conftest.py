"""``polytrain launch`` and ``doctor`` in this process, for the checks that start no training process.

Commands that start training processes go through ``tests.helpers.polytrain`` (a fresh interpreter).
"""

from dataclasses import dataclass

import pytest

from polytrain.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error(self) -> str:
        """The one ``polytrain: error:`` line (asserting there is exactly one)."""
        lines = [line for line in self.err.splitlines() if line.startswith("polytrain: error: ")]
        assert len(lines) == 1, self.err
        return lines[0].removeprefix("polytrain: error: ")


@pytest.fixture
def cli(capsys):
    def run(*args) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run
