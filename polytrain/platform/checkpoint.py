"""Checkpoints: save, resume (on any number of processes), export; atomic; never an unrestricted unpickle.

Layout of ``RUN_DIR/checkpoints/step_00000300/``::

    model.safetensors    consolidated weights (what eval, export and fine-tuning read)
    deepspeed/zero/      DeepSpeed's per-rank model and optimizer shards (for resuming training)
    rng/rank<r>.json     python and numpy RNG state of rank r; rng/rank<r>.safetensors: torch's
    config.yaml          the resolved config
    tokenizer.json       the text tokenizer
    trainer_state.json   step, data stream position, scheduler, skipped steps, W&B run id, world size

Everything is written to ``.tmp-step_*`` and renamed into place; only then is
``checkpoints/latest`` replaced (atomically), so a crash mid-save leaves it
pointing at the previous complete checkpoint.

DeepSpeed keeps its shards in ``torch.save`` pickles and loads them with
``weights_only=False``.  Every DeepSpeed load here runs inside
``safe_unpickling()``, which forces ``weights_only=True`` and allows only the few
DeepSpeed classes those files hold, so a crafted file cannot run code.
"""

import importlib
import json
import os
import pickle
import random
import shutil
from argparse import Namespace
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from polytrain.errors import DataError
from polytrain.models.lora import LoraConfig, merge_lora

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
STATE = "trainer_state.json"
SHARDS = "deepspeed"
UNIVERSAL = "deepspeed_universal"
UNIVERSAL_INFO = "universal_checkpoint_info"
DEEPSPEED_PICKLED_CLASSES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The only non-tensor classes DeepSpeed's checkpoint files hold (found by loading every stage/precision)."""


@contextmanager
def safe_unpickling():
    """While active, ``torch.load`` is ``weights_only=True`` with DeepSpeed's few classes allowed."""
    allowed = [getattr(importlib.import_module(module), name)
               for module, name in (path.rsplit(".", 1) for path in DEEPSPEED_PICKLED_CLASSES)]
    original = torch.load

    def restricted_load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return original(f, *args, **kwargs)
        except pickle.UnpicklingError as err:
            lines = str(err).strip().splitlines()
            reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
            raise DataError(f"{f}: refused to load, it holds more than tensors and DeepSpeed's own state "
                            f"({reason})") from None

    with torch.serialization.safe_globals(allowed):
        torch.load = restricted_load
        try:
            yield
        finally:
            torch.load = original


def save_checkpoint(engine, model: nn.Module, run_dir: Path, step: int, config_yaml: str, tokenizer_file: Path,
                    state: dict) -> Path:
    """Save on every rank (ZeRO shards and RNG states are per rank); returns the final folder."""
    root = run_dir / CHECKPOINTS
    final, tmp = root / f"step_{step:08d}", root / f".tmp-step_{step:08d}"
    if engine.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    engine.barrier()
    engine.save_shards(model, tmp / SHARDS)
    save_rng(tmp / "rng", engine.rank)
    weights = engine.full_state_dict(model)
    if engine.is_main:
        save_file({name: t.contiguous() for name, t in weights.items()}, tmp / WEIGHTS, metadata={"step": str(step)})
        (tmp / CONFIG).write_text(config_yaml)
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER)
        (tmp / STATE).write_text(json.dumps({"step": step, "world_size": engine.world_size, **state}, indent=1) + "\n")
    engine.barrier()
    if engine.is_main:
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


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE).read_text())


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


def convert_to_universal(folder: Path) -> Path:
    """DeepSpeed's universal (world-size independent) form of ``folder``'s shards, converted once.

    Run on one process; returns the folder to pass to ``Engine.load_shards``.
    """
    from deepspeed.checkpoint import ds_to_universal

    out = folder / UNIVERSAL
    if out.is_dir():
        return out
    tmp = folder / f".{UNIVERSAL}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(input_folder=str(folder / SHARDS / "zero"), output_folder=str(tmp / "zero"),
                     num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=False)
    with safe_unpickling():
        ds_to_universal.main(args)
    tmp.rename(out)
    return out


def load_weights(model: nn.Module, path: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Load the safetensors weights at ``path`` (never a pickle), or ``state`` read from it already;
    names and shapes must match exactly."""
    state = load_file(str(path)) if state is None else state
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in set(state) & set(expected) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise DataError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                        f"shape mismatches {wrong[:5]}")
    model.load_state_dict(state)


def export_model(run_dir: str | Path, out: Path) -> Path:
    """Consolidate a checkpoint into one fp32 safetensors file that carries its config and tokenizer.

    ZeRO shards (stage >= 1) are merged from the fp32 master copies in the optimizer shards;
    stage-0 checkpoints already hold whole weights.  LoRA adapters are folded into the weights they
    adapt, and the exported config has LoRA off, so the file loads into the plain model.  Also
    writes the config beside it as ``<out>.yaml``.
    """
    folder = latest_checkpoint(run_dir)
    state = read_state(folder)
    if state.get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_unpickling():
            weights = get_fp32_state_dict_from_zero_checkpoint(str(folder / SHARDS), tag="zero")
    else:
        weights = load_file(str(folder / WEIGHTS))
    weights, config_yaml = without_lora(weights, (folder / CONFIG).read_text())
    metadata = {"polytrain_config": config_yaml, "polytrain_tokenizer": (folder / TOKENIZER).read_text(),
                "step": str(state["step"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: t.float().contiguous() for name, t in weights.items()}, out, metadata=metadata)
    out.with_suffix(".yaml").write_text(config_yaml)
    return out


def without_lora(weights: dict[str, torch.Tensor], config_yaml: str) -> tuple[dict[str, torch.Tensor], str]:
    """Weights with LoRA adapters merged, and the config with LoRA off; unchanged when the run had none."""
    tree = yaml.safe_load(config_yaml)
    lora = tree.get("finetune", {}).get("lora", {})
    if not lora.get("rank"):
        return weights, config_yaml
    merged = merge_lora(weights, LoraConfig(**lora).scale)
    lora["rank"] = 0
    return merged, yaml.safe_dump(tree, sort_keys=False)


@dataclass
class Pretrained:
    """Weights to start from, with the config and text tokenizer they were trained with."""

    path: Path
    """The safetensors file holding the weights."""
    config_yaml: str
    tokenizer_json: str

    def weights(self) -> dict[str, torch.Tensor]:
        """Read now (not before: they can be large), LoRA adapters merged into the weights they adapted."""
        return without_lora(load_file(str(self.path)), self.config_yaml)[0]


def read_pretrained(path: str | Path) -> Pretrained:
    """A run directory, a checkpoint folder or an exported file, checked; nothing is ever unpickled."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        folder = latest_checkpoint(path)
        return Pretrained(folder / WEIGHTS, (folder / CONFIG).read_text(), (folder / TOKENIZER).read_text())
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise DataError(f"{path}: not a safetensors file, a run directory or a checkpoint folder ({err})") from None
    if "polytrain_config" not in metadata:
        raise DataError(f"{path}: not a polytrain export (no polytrain_config in its metadata); write one with "
                        "polytrain export RUN_DIR --out FILE")
    return Pretrained(path, metadata["polytrain_config"], metadata["polytrain_tokenizer"])


def load_exported(path: Path):
    """(config, tokenizers, model) rebuilt from an ``export_model`` file, weights loaded."""
    import tempfile

    from polytrain.config import load_config
    from polytrain.platform import recipe

    pretrained = read_pretrained(path)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CONFIG).write_text(pretrained.config_yaml)
        (Path(tmp) / TOKENIZER).write_text(pretrained.tokenizer_json)
        cfg = load_config(Path(tmp) / CONFIG)
        tokenizers = recipe.build_tokenizers(cfg, Path(tmp) / TOKENIZER)
    model = recipe.build_model(cfg, tokenizers)
    load_weights(model, path, pretrained.weights())
    return cfg, tokenizers, model
