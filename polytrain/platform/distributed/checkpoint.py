"""Checkpoints: save and resume (on any number of processes); atomic; never an unrestricted unpickle.

A checkpoint folder (``RUN_DIR/checkpoints/step_00000300/``, laid out in
``observe/run_dir.py``) holds the consolidated weights, DeepSpeed's per-rank
shards, every rank's RNG state, the config, the tokenizer and the trainer
state.  Everything is written to a temporary folder beside it and renamed into
place (``polytrain.atomic``); only then is ``checkpoints/latest`` replaced,
atomically too, so a crash mid-save leaves it naming the previous complete
checkpoint.  A write that fails (a full disk, a quota, a file-size limit) fails
the whole checkpoint on every rank alike: each rank writes what it can,
counting the bytes, then the ranks share what failed, the temporary folder is
removed and ``CheckpointWriteError`` says how much room a checkpoint needs.

DeepSpeed keeps its shards in ``torch.save`` pickles and loads them with
``weights_only=False``.  Every DeepSpeed load here runs inside
``safe_unpickling()``, which forces ``weights_only=True`` and allows only the few
DeepSpeed classes those files hold, so a crafted file cannot run code.
"""

import importlib
import json
import pickle
import random
import resource
import shutil
from argparse import Namespace
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from polytrain import atomic
from polytrain.errors import DataError, PolytrainError
from polytrain.platform.observe.run_dir import SHARD_TAG, CheckpointDir, RunDir

UNIVERSAL_INFO = "universal_checkpoint_info"
DEEPSPEED_PICKLED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The only non-tensor classes DeepSpeed's checkpoint files hold (found by loading every stage/precision)."""


WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
"""What a write that finds no room raises: OSError from Python, RuntimeError from torch.save ("unexpected pos",
"file write failed"), SafetensorError from safetensors."""


class CheckpointWriteError(PolytrainError):
    """A checkpoint could not be written; ``checkpoints/latest`` still names the previous one."""


class Writes:
    """One rank's writes for a checkpoint: the bytes written (or meant to be, where a write failed) and the first
    failure, kept rather than raised so that every rank goes through the same collectives."""

    def __init__(self):
        self.bytes = 0
        self.failure: str | None = None

    def __call__(self, paths: list[Path], size: int, write: Callable[[], Any]) -> None:
        """``write()`` produces ``paths``; ``size`` is the bytes it means to write (what is counted if it fails)."""
        try:
            write()
            self.bytes += sum(path.stat().st_size for path in paths)
        except WRITE_ERRORS as err:
            self.bytes += size
            self.failure = self.failure or " ".join(f"{paths[0]}: {type(err).__name__}: {err}".split())


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what saving it writes, give or take the headers."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def deepspeed_classes() -> list[type]:
    return [getattr(importlib.import_module(module), name)
            for module, name in (path.rsplit(".", 1) for path in DEEPSPEED_PICKLED_CLASSES)]


def restricted(load: Callable) -> Callable:
    """``load`` (``torch.load``) with ``weights_only=True`` and DeepSpeed's few classes allowed; a file that holds
    anything else is a ``DataError`` naming it."""
    def restricted_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            with torch.serialization.safe_globals(deepspeed_classes()):
                return load(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            lines = str(err).strip().splitlines()
            reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
            raise DataError(f"{f}: refused to load, it holds more than tensors and DeepSpeed's own state "
                            f"({reason})") from None

    return restricted_load


@contextmanager
def safe_unpickling():
    """While active, ``torch.load`` is ``restricted``: for DeepSpeed's code that calls ``torch.load`` itself
    rather than through its checkpoint engine (the universal-checkpoint converter and loader, zero_to_fp32)."""
    original = torch.load
    torch.load = restricted(original)
    try:
        yield
    finally:
        torch.load = original


def save_checkpoint(engine, model: nn.Module, run_dir: RunDir, step: int, config_yaml: str, tokenizer_file: Path,
                    state: dict) -> CheckpointDir:
    """Save on every rank (ZeRO shards and RNG states are per rank); returns the final folder.

    ``state`` is the trainer's resumable state (``TrainerState.state_dict()``) plus what the checkpoint
    says about itself (ZeRO stage, replica digests); the world size is added here.
    """
    final = run_dir.checkpoint(step)
    tmp = CheckpointDir(atomic.temporary(final.path, private=False))  # every rank writes into it
    writes = Writes()
    if engine.is_main:
        shutil.rmtree(tmp.path, ignore_errors=True)
        writes([tmp.rng], 0, lambda: tmp.rng.mkdir(parents=True))
    engine.barrier()
    engine.save_shards(model, tmp.shards, writes)
    writes(rng_files(tmp.rng, engine.rank), RNG_BYTES, lambda: save_rng(tmp.rng, engine.rank))
    weights = engine.full_state_dict(model)
    if engine.is_main:
        writes([tmp.weights], tensor_bytes(weights), lambda: save_file(
            {name: t.contiguous() for name, t in weights.items()}, tmp.weights, metadata={"step": str(step)}))
        texts = {tmp.config: config_yaml, tmp.state: json.dumps(
            {"step": step, "world_size": engine.world_size, **state}, indent=1) + "\n"}
        for path, text in texts.items():
            writes([path], len(text.encode()), lambda: path.write_text(text))
        writes([tmp.tokenizer], tokenizer_file.stat().st_size, lambda: shutil.copyfile(tokenizer_file, tmp.tokenizer))
    reports = engine.gather((writes.failure, writes.bytes))
    failures = [failure for failure, _ in reports if failure]
    if failures:
        if engine.is_main:
            shutil.rmtree(tmp.path, ignore_errors=True)
        engine.barrier()
        raise CheckpointWriteError(write_failure(final, failures, sum(size for _, size in reports), run_dir))
    if engine.is_main:
        atomic.publish(tmp.path, final.path)
        atomic.write_text(run_dir.latest, final.path.name + "\n")
    engine.barrier()
    return final


RNG_BYTES = 20_000
"""About what ``save_rng`` writes per rank (Python's and numpy's Mersenne Twister states, torch's generator)."""


def write_failure(final: CheckpointDir, failures: list[str], needed: int, run_dir: RunDir) -> str:
    """One line: what failed, how much room a checkpoint of this run needs, what there is, what stays."""
    from polytrain.platform.distributed.memory_planner import format_bytes

    folder = next(p for p in (run_dir.checkpoints, *run_dir.checkpoints.parents) if p.exists())
    room = f"the filesystem of {folder} has {format_bytes(shutil.disk_usage(folder).free)} free"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        room += f", and this process may write files of at most {format_bytes(limit)} (ulimit -f)"
    previous = (f"checkpoints/latest still names {run_dir.latest.read_text().strip()}" if run_dir.latest.is_file()
                else "there is no earlier checkpoint")
    more = f" (and {len(failures) - 1} more rank(s))" if len(failures) > 1 else ""
    return (f"checkpoint {final.path.name} could not be written: {failures[0]}{more}; a checkpoint of this run "
            f"needs at least {format_bytes(needed)} (all ranks), {room}; {previous}")


def latest_checkpoint(path: str | Path) -> CheckpointDir:
    """The newest complete checkpoint of a run directory (or a checkpoint folder given directly)."""
    given = CheckpointDir(Path(path))
    if given.weights.is_file():
        return given
    run = RunDir(Path(path))
    if not run.latest.is_file():
        raise DataError(f"{path}: no checkpoint ({run.latest} not found); is this a polytrain run directory?")
    folder = CheckpointDir(run.checkpoints / run.latest.read_text().strip())
    if not folder.weights.is_file():
        raise DataError(f"{run.latest} names {folder.path.name}, which has no {folder.weights.name}")
    return folder


def convert_to_universal(folder: CheckpointDir) -> Path:
    """DeepSpeed's universal (world-size independent) form of ``folder``'s shards, converted once.

    Run on one process; returns the folder to pass to ``Engine.load_shards``.
    """
    from deepspeed.checkpoint import ds_to_universal

    if folder.universal.is_dir():
        return folder.universal
    with atomic.folder(folder.universal, replace=False) as tmp:
        args = Namespace(input_folder=str(folder.shards / SHARD_TAG), output_folder=str(tmp / SHARD_TAG),
                         num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                         inject_missing_state=False)
        with safe_unpickling():
            ds_to_universal.main(args)
    return folder.universal


def read_state(path: Path) -> dict:
    """A checkpoint's ``trainer_state.json``."""
    return json.loads(path.read_text())


def rng_files(directory: Path, rank: int) -> list[Path]:
    """The files ``save_rng`` writes for ``rank``."""
    return [directory / f"rank{rank}.json", directory / f"rank{rank}.safetensors"]


def save_rng(directory: Path, rank: int) -> None:
    """This rank's python, numpy and torch generator states (JSON and safetensors, no pickle)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    (directory / f"rank{rank}.json").write_text(json.dumps({
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}))
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, directory / f"rank{rank}.safetensors")


def restore_rng(directory: Path, rank: int) -> bool:
    """Restore what ``save_rng`` wrote for ``rank``; False if the checkpoint has no state for it."""
    path = directory / f"rank{rank}.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    tensors = load_file(str(directory / f"rank{rank}.safetensors"))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    return True
