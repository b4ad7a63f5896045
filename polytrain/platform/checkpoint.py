"""Checkpoints: written to a temporary folder, renamed into place, then ``latest`` is repointed.

Layout of ``RUN_DIR/checkpoints/step_00000300/``::

    model.safetensors    consolidated weights (what eval, export and fine-tuning read)
    deepspeed/zero/      DeepSpeed's per-rank model and optimizer shards (for resuming training)
    config.yaml          the resolved config
    tokenizer.json       the text tokenizer
    trainer_state.json   step, tokens seen, W&B run id

``checkpoints/latest`` holds the name of the newest complete checkpoint; it is
replaced atomically, so a crash mid-save leaves it pointing at the previous one.
"""

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from polytrain.errors import DataError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
STATE = "trainer_state.json"


def save_checkpoint(engine, model: nn.Module, run_dir: Path, step: int, config_yaml: str,
                    tokenizer_file: Path, trainer_state: dict) -> Path:
    """Save on every rank (ZeRO shards are per rank); returns the final folder."""
    root = run_dir / CHECKPOINTS
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    engine.save_shards(model, tmp / "deepspeed")
    weights = engine.full_state_dict(model)
    if engine.is_main:
        save_file({name: t.contiguous() for name, t in weights.items()}, tmp / WEIGHTS, metadata={"step": str(step)})
        (tmp / CONFIG).write_text(config_yaml)
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
        (tmp / STATE).write_text(json.dumps({"step": step, **trainer_state}, indent=1) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        write_atomically(root / LATEST, final.name + "\n")
    engine.barrier()
    return final


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The newest complete checkpoint of a run directory (or a checkpoint folder given directly)."""
    run_dir = Path(run_dir)
    if (run_dir / WEIGHTS).is_file():
        return run_dir
    pointer = run_dir / CHECKPOINTS / LATEST
    if not pointer.is_file():
        raise DataError(f"{run_dir}: no checkpoint ({pointer} not found); is this a polytrain run directory?")
    folder = run_dir / CHECKPOINTS / pointer.read_text().strip()
    if not (folder / WEIGHTS).is_file():
        raise DataError(f"{pointer} names {folder.name}, which has no {WEIGHTS}")
    return folder


def load_weights(model: nn.Module, path: Path) -> None:
    """Load safetensors weights (never a pickle); names and shapes must match exactly."""
    state = load_file(str(path))
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise DataError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                        f"shape mismatches {wrong[:5]}")
    model.load_state_dict(state)
