"""Shared fixtures; ``gpu``-marked tests take the ``device`` fixture: the GPU where there is one, else the CPU."""

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")  # tests never reach the network
os.environ.setdefault("WANDB_SILENT", "true")
# The suite runs one test process per core (make test: -n 2), each starting training processes of its own: one
# compute thread per process keeps the cores from being oversubscribed (torchrun sets the same for its ranks).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def device():
    """Where the ``gpu``-marked tests run: CUDA where there is a GPU; else the CPU, with the same code at the
    tests' CPU sizes and the kernels the CPU has (those it lacks skip, saying why), so every line runs in CI."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One copy of the built-in datasets for the whole session."""
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
