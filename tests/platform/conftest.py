"""Fixtures of the engine tests: a folder of runs per test module, and the one-process reference run."""

import pytest

from tests.platform.runs import DOUBLE, Runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    return Runs(tmp_path_factory.mktemp("engine"), data_cache)


@pytest.fixture(scope="session")
def single_double(tmp_path_factory, data_cache):
    """One process with every micro-batch doubled: the same global batch as the 2-process runs."""
    return Runs(tmp_path_factory.mktemp("single"), data_cache).train("single", *DOUBLE, "train.save_every=10")
