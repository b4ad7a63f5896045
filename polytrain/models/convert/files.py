"""Checkpoint files as the libraries save them, read and written without ever unpickling.

A Hugging Face folder (``save_pretrained``): ``config.json``, the weights in
``model.safetensors`` or in shards listed by ``model.safetensors.index.json``,
and ``tokenizer.json`` when there is one.  timm's folders have the same names
(its ``config.json`` names an ``architecture``); a bare timm checkpoint is one
``.safetensors`` file.  Pickled weights (``pytorch_model.bin``, ``.pth``,
``.pt``) can run any code when loaded, so they are refused with how to
convert them.
"""

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from polytrain.models.convert.rules import ConversionError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Suffixes of pickled weight files (``pytorch_model.bin``, ``model.pth``, ...)."""


def refuse_pickle(path: Path) -> ConversionError:
    return ConversionError(
        f"{path}: pickled weights, which polytrain never loads (unpickling can run any code); where you trust "
        "the file, load it and save safetensors: model.save_pretrained(folder, safe_serialization=True) for "
        "Hugging Face, safetensors.torch.save_file(model.state_dict(), 'model.safetensors') for timm")


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of one ``.safetensors`` file."""
    if path.suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise ConversionError(f"{path}: not a .safetensors file")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    return load_file(path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


def read_sharded(index_path: Path) -> dict[str, Tensor]:
    """The tensors of every shard ``index_path`` lists; each listed tensor must be in its shard."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index_path}: no 'weight_map' of tensor name -> shard file")
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(read_weights(index_path.parent / shard))
    missing = sorted(name for name, shard in weight_map.items() if name not in state)
    if missing:
        raise ConversionError(f"{index_path}: {missing[0]!r} is not in its shard {weight_map[missing[0]]}")
    return state


def read_folder_weights(folder: Path) -> dict[str, Tensor]:
    """The tensors of a ``save_pretrained`` folder: ``model.safetensors``, or the shards its index lists."""
    if (folder / WEIGHTS).is_file():
        return read_weights(folder / WEIGHTS)
    if (folder / SHARD_INDEX).is_file():
        return read_sharded(folder / SHARD_INDEX)
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise refuse_pickle(pickles[0])
    raise ConversionError(f"{folder}: no {WEIGHTS} or {SHARD_INDEX}")


def write_folder(folder: Path, config: dict, state: dict[str, Tensor], tokenizer: Path | None = None) -> None:
    """``config.json``, ``model.safetensors`` and (a copy of ``tokenizer``) ``tokenizer.json`` in a new ``folder``.

    An existing folder with anything in it is refused: stale shards or weights beside the new ones would
    be read in their place.
    """
    if folder.exists() and any(folder.iterdir()):
        raise ConversionError(f"{folder}: not empty; give a new folder to write the checkpoint to")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})  # transformers checks the format tag
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / TOKENIZER)
