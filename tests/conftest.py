"""Shared fixtures; GPU-marked tests are skipped where there is no CUDA device."""

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")  # tests never reach the network
os.environ.setdefault("WANDB_SILENT", "true")
# The suite runs one test process per core (make test: -n 2), each starting training processes of its own: one
# compute thread per process keeps the cores from being oversubscribed (torchrun sets the same for its ranks).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One copy of the built-in datasets for the whole session."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
