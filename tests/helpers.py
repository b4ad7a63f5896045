"""Helpers the tests share: the CLI in a subprocess, JSONL and W&B offline-log readers.

Training runs go through the real CLI in subprocesses: Accelerate and DeepSpeed keep
process-wide state, so each run gets a fresh interpreter, as a user's would.
"""

import json
import logging
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def polytrain(*args: str, cwd: Path, timeout: float = 600, python: str | Path = sys.executable
              ) -> subprocess.CompletedProcess:
    """Run the ``polytrain`` CLI in a fresh interpreter (``python``'s); returns the finished process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(python), "-m", "polytrain.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


WANDB_BLOCK = 32 * 1024
WANDB_HEADER = 7  # b":W&B", 2-byte magic, 1-byte version


def wandb_records(path: Path) -> list:
    """The ``wandb_internal_pb2.Record`` protobufs of an offline W&B run file (``run-<id>.wandb``).

    The file is a LevelDB-style log: 32 KiB blocks of records, each a 7-byte header
    (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) and a
    fragment of a record.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    pos, parts, records = WANDB_HEADER, [], []
    while pos + 7 <= len(data):
        if WANDB_BLOCK - pos % WANDB_BLOCK < 7:  # block trailer too short for a header: padding
            pos += WANDB_BLOCK - pos % WANDB_BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        parts.append(data[pos + 7: pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            records.append(record)
    return records


def wandb_items(items) -> dict:
    """History or config items as {key: value}; nested keys joined with '/'."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def wandb_history(path: Path) -> list[dict]:
    """The ``history`` rows of an offline W&B run file."""
    return [wandb_items(r.history.item) for r in wandb_records(path) if r.WhichOneof("record_type") == "history"]


def wandb_config(path: Path) -> dict:
    """The run config of an offline W&B run file: the one it started with, then every update."""
    config = {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            config.update(wandb_items((record.run.config if kind == "run" else record.config).update))
    return config


def lm(family: str, dim: int, layers: int, heads: int, vocab: int, positions: int, kv_heads: int = 0,
       hidden: int = 0, **backbone):
    """A decoder-only ``PolyModel`` shaped like ``config.presets``' ``llama`` or ``gpt2`` at a test's size, with
    ``backbone`` fields changed (``attention="sdpa_math"``)."""
    from dataclasses import replace

    from polytrain.config import presets
    from polytrain.models.model import PolyModel
    from polytrain.tokens import EmbedSpec

    model = presets.llama(dim, layers, heads, kv_heads or heads, hidden) if family == "llama" else \
        presets.gpt2(dim, layers, heads)
    model = replace(model, backbone=replace(model.backbone, **backbone))
    return PolyModel(model, [EmbedSpec("text", vocab, (1, positions))], {"lm": "decoder_only"})


def trained_run(path):
    """(config, tokenizers, model) of a trained run directory, checkpoint folder or export, as ``polytrain eval``
    rebuilds them."""
    from polytrain.job import Job

    job = Job.of_run(path)
    return job.cfg, job.tokenizers, job.trained_model()


JOB_LINE = re.compile(r"job \S+: model ([\d,]+) parameters \(([\d,]+) trainable\); text tokenizer sha256 ([0-9a-f]{64})")
"""The line every command that resolves a job logs (``Job.summary``): parameters, trainable ones, the tokenizer."""


def job_seen(text: str) -> tuple[int, int, str]:
    """(parameters, trainable, tokenizer sha256) of the job line in ``text``."""
    match = JOB_LINE.search(text)
    assert match, f"no job line in {text[-2000:]}"
    return int(match[1].replace(",", "")), int(match[2].replace(",", "")), match[3]


@contextmanager
def logged():
    """The records polytrain logs (INFO and up) while inside, as one growing list of lines."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("polytrain")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
