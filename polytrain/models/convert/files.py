"""Checkpoint files as the libraries save them, read and written without ever unpickling.

A Hugging Face folder (``save_pretrained``): ``config.json``, the weights in
``model.safetensors`` or in shards listed by ``model.safetensors.index.json``,
and ``tokenizer.json`` (with ``tokenizer_config.json`` naming its special tokens) when there is one.  timm's folders have the same names
(its ``config.json`` names an ``architecture``); a bare timm checkpoint is one
``.safetensors`` file.  Pickled weights (``pytorch_model.bin``, ``.pth``,
``.pt``) can run any code when loaded, so they are refused with how to
convert them.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from polytrain import atomic
from polytrain.models.convert.rules import ConversionError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
PREPROCESSOR = "preprocessor_config.json"
"""A Hugging Face image processor's or feature extractor's settings (size, mean and std; mel bins and hop)."""
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
SPECIAL_ROLES = ("bos", "eos", "pad", "mask", "unk")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""Suffixes of pickled weight files (``pytorch_model.bin``, ``model.pth``, ...)."""


def refuse_pickle(path: Path) -> ConversionError:
    return ConversionError(
        f"{path}: pickled weights, which polytrain never loads (unpickling can run any code); where you trust "
        "the file, load it and save safetensors: model.save_pretrained(folder, safe_serialization=True) for "
        "Hugging Face, safetensors.torch.save_file(model.state_dict(), 'model.safetensors') for timm")


def weights_file(path: Path) -> Path:
    """``path``, checked to be a ``.safetensors`` file (a pickle is refused unopened)."""
    if path.suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise ConversionError(f"{path}: not a .safetensors file")
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    return path


def read_weights(files: list[Path]) -> dict[str, Tensor]:
    """The tensors of ``.safetensors`` files (a checkpoint's shards, or its one file)."""
    state = {}
    for path in files:
        state.update(load_file(weights_file(path)))
    return state


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


def shard_files(index_path: Path) -> list[Path]:
    """The shard files ``index_path`` lists, each checked to be there."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ConversionError(f"{index_path}: no 'weight_map' of tensor name -> shard file")
    return [weights_file(index_path.parent / shard) for shard in sorted(set(weight_map.values()))]


def check_sharded(index_path: Path, state: dict[str, Tensor]) -> None:
    """Every tensor ``index_path`` lists is in the shards read into ``state``."""
    weight_map = read_json(index_path)["weight_map"]
    missing = sorted(name for name in weight_map if name not in state)
    if missing:
        raise ConversionError(f"{index_path}: {missing[0]!r} is not in its shard {weight_map[missing[0]]}")


def folder_weights(folder: Path) -> tuple[list[Path], Path | None]:
    """The weight files of a ``save_pretrained`` folder, checked to be there: ``model.safetensors``, or the shards
    its index lists (with the index)."""
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS], None
    if (folder / SHARD_INDEX).is_file():
        return shard_files(folder / SHARD_INDEX), folder / SHARD_INDEX
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise refuse_pickle(pickles[0])
    raise ConversionError(f"{folder}: no {WEIGHTS} or {SHARD_INDEX}")


def special_tokens(folder: Path, config: dict) -> dict[str, str]:
    """The folder's bos, eos, pad and mask tokens, by role: as ``tokenizer_config.json`` (or the older
    ``special_tokens_map.json``) names them, else as ``config.json``'s ``*_token_id`` say; BERT's [CLS] and [SEP]
    serve as bos and eos.  Roles the checkpoint has no token for are left out."""
    named: dict[str, str] = {}
    for name in (SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG):
        if (folder / name).is_file():
            named.update({key: token for key, value in read_json(folder / name).items()
                          if (token := value.get("content") if isinstance(value, dict) else value)
                          and key.endswith("_token") and isinstance(token, str)})
    by_id = token_names(folder / TOKENIZER)
    for role in ("bos", "eos", "pad"):
        ids = config.get(f"{role}_token_id")
        first = ids[0] if isinstance(ids, list) and ids else ids
        if f"{role}_token" not in named and isinstance(first, int) and first in by_id:
            named[f"{role}_token"] = by_id[first]
    fallbacks = {"bos": "cls_token", "eos": "sep_token"}
    roles = {role: named.get(f"{role}_token") or named.get(fallbacks.get(role, "")) for role in SPECIAL_ROLES}
    return {role: token for role, token in roles.items() if token}


def token_names(path: Path) -> dict[int, str]:
    """id -> token of a ``tokenizer.json``'s vocabulary and added tokens (empty without the file)."""
    if not path.is_file():
        return {}
    tokenizer = read_json(path)
    vocab = tokenizer.get("model", {}).get("vocab")
    names = {i: token for token, i in vocab.items()} if isinstance(vocab, dict) else {}
    names.update({t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])})
    return names


@dataclass(frozen=True)
class TokenizerFiles:
    """A text tokenizer as a checkpoint folder carries it."""

    json: str
    """``tokenizer.json``'s text."""
    special: dict[str, tuple[str, int]]
    """Role (bos, eos, pad, mask, unk) -> (token, id), for ``tokenizer_config.json`` and the model config's ids."""


def write_folder(folder: Path, config: dict, state: dict[str, Tensor], tokenizer: TokenizerFiles | None = None) -> None:
    """``config.json``, ``model.safetensors`` and the tokenizer's files (``tokenizer.json``, ``tokenizer_config.json``
    with its special tokens) in ``folder``, filled under a temporary name and renamed into place, so no reader
    ever sees it half-written.

    An existing folder with anything in it is refused: stale shards or weights beside the new ones would
    be read in their place.
    """
    if folder.exists() and any(folder.iterdir()):
        raise ConversionError(f"{folder}: not empty; give a new folder to write the checkpoint to")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic.folder(folder) as tmp:
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})  # transformers checks the format tag
        if tokenizer is not None:
            (tmp / TOKENIZER).write_text(tokenizer.json, encoding="utf-8")
            names = {f"{role}_token": token for role, (token, _) in tokenizer.special.items() if role in SPECIAL_ROLES}
            (tmp / TOKENIZER_CONFIG).write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **names},
                                                           indent=2) + "\n")
