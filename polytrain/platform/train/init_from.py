"""Where a run's weights start: a run directory, a checkpoint folder or an exported file; matched by name.

``read_pretrained`` checks the source before anything is loaded (nothing is
ever unpickled); ``load_initial_weights`` copies what fits into a new model and
reports what it loaded, left new and ignored (``init_from.json``);
``load_model`` rebuilds a whole trained model in one process.
"""

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from polytrain import atomic
from polytrain.config import Config, config_from_yaml
from polytrain.errors import DataError
from polytrain.models.lora import is_adapter
from polytrain.models.model import PolyModel
from polytrain.platform.distributed.checkpoint import latest_checkpoint, load_weights, without_lora
from polytrain.platform.observe.run_dir import RunDir
from polytrain.platform.train import recipe


@dataclass
class Pretrained:
    """Weights to start from, with the config and text tokenizer they were trained with."""

    path: Path
    """The safetensors file holding the weights."""
    config_yaml: str
    tokenizer_json: str

    def merged(self) -> tuple[dict[str, torch.Tensor], str]:
        """The weights, read now (not before: they can be large), with LoRA adapters merged into the weights
        they adapted, and the config with LoRA off (which builds the model they fit)."""
        return without_lora(load_file(str(self.path)), self.config_yaml)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.merged()[0]


def read_pretrained(path: str | Path) -> Pretrained:
    """A run directory, a checkpoint folder or an exported file, checked; nothing is ever unpickled."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        folder = latest_checkpoint(path)
        return Pretrained(folder.weights, folder.config.read_text(), folder.tokenizer.read_text())
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise DataError(f"{path}: not a safetensors file, a run directory or a checkpoint folder ({err})") from None
    if "polytrain_config" not in metadata:
        raise DataError(f"{path}: not a polytrain export (no polytrain_config in its metadata); write one with "
                        "polytrain export RUN_DIR --out FILE")
    return Pretrained(path, metadata["polytrain_config"], metadata["polytrain_tokenizer"])


def load_model(path: str | Path) -> tuple[Config, dict[str, Any], PolyModel]:
    """(config, tokenizers, model) rebuilt from a run directory, a checkpoint folder or a file written by
    ``polytrain export``, its weights loaded (LoRA adapters merged)."""
    pretrained = read_pretrained(path)
    weights, config_yaml = pretrained.merged()
    cfg = config_from_yaml(config_yaml, f"{path} (its config)")
    with tempfile.TemporaryDirectory() as tmp:  # an export carries its tokenizer in its metadata
        tokenizer_file = Path(tmp) / "tokenizer.json"
        tokenizer_file.write_text(pretrained.tokenizer_json, encoding="utf-8")
        tokenizers = recipe.build_tokenizers(cfg, tokenizer_file)
    model = recipe.build_model(cfg, tokenizers)
    load_weights(model, pretrained.path, weights)
    return cfg, tokenizers, model


@dataclass
class InitReport:
    """What ``load_initial_weights`` did, tensor by tensor."""

    source: str
    loaded: list[str]
    new: list[str]
    """In the model, not in the source: left as initialized."""
    ignored: list[str]
    """In the source, not in the model (e.g. a pretraining task's own head)."""
    extended: list[str] = field(default_factory=list)
    """Vocabulary tables the model has more rows of (tokens the run added, such as a new modality's span
    markers): their old rows loaded, the new ones left as initialized."""

    def write(self, run_dir: RunDir) -> None:
        atomic.write_text(run_dir.init_report, json.dumps(self.__dict__, indent=1) + "\n")

    def summary(self) -> str:
        """One log line; LoRA adapters (always new) are counted rather than listed."""
        new = [name for name in self.new if not is_adapter(name)]
        adapters = f" and {len(self.new) - len(new)} LoRA adapter tensors" if len(new) < len(self.new) else ""
        return (f"init_from {self.source}: loaded {len(self.loaded)} tensors; newly initialized {len(self.new)}: "
                f"{', '.join(new) or '-'}{adapters}; ignored {len(self.ignored)}: {', '.join(self.ignored) or '-'}"
                + (f"; vocabulary extended: {', '.join(self.extended)}" if self.extended else "")
                + " (full lists in init_from.json)")


VOCABULARY_TABLES = ("embedders.text.table.weight", "embedders.text.output_bias", "lm_head.weight", "lm_head.bias")
"""Tensors with one row per text token."""


def load_initial_weights(model: nn.Module, source: str, weights: dict[str, torch.Tensor]) -> InitReport:
    """Copy the tensors of ``weights`` into ``model`` by name; a shape mismatch stops with the tensor's name."""
    own = model.state_dict()
    extended = [name for name in own if name.endswith(VOCABULARY_TABLES) and name in weights
                and own[name].shape[0] > weights[name].shape[0] and own[name].shape[1:] == weights[name].shape[1:]]
    mismatched = [f"{name}: {source} has {tuple(weights[name].shape)}, the model {tuple(own[name].shape)}"
                  for name in own if name in weights and weights[name].shape != own[name].shape
                  and name not in extended]
    if mismatched:
        raise DataError(f"init_from: tensor shapes differ, so the checkpoint was trained with another architecture "
                        f"(configure the model as it was): {'; '.join(mismatched[:3])}"
                        + (f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""))
    loaded = [name for name in own if name in weights]
    if not loaded:
        raise DataError(f"init_from: {source} shares no tensor name with this model; it is not a polytrain "
                        f"checkpoint of this kind of model (its tensors look like {', '.join(list(weights)[:3])})")
    with torch.no_grad():
        for name in loaded:
            own[name][: len(weights[name])].copy_(weights[name])
    return InitReport(source, loaded, [n for n in own if n not in weights], [n for n in weights if n not in own],
                      extended)
