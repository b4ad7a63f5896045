"""Where a run's weights start: a run directory, a checkpoint folder or an exported file; matched by name.

``read_pretrained`` checks the source before anything is loaded (nothing is
ever unpickled); ``load_initial_weights`` copies what fits into a new model and
reports what it loaded, left new and ignored (``init_from.json``);
``load_weights`` fills a whole trained model (``Job.of_run`` builds it).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from polytrain import atomic
from polytrain.config.model import LoraConfig
from polytrain.errors import DataError
from polytrain.models.lora import is_adapter, merge_lora
from polytrain.platform.distributed.checkpoint import latest_checkpoint
from polytrain.platform.observe.run_dir import RunDir


@dataclass
class Pretrained:
    """Weights to start from, with the config and text tokenizer they were trained with."""

    path: Path
    """The safetensors file holding the weights."""
    config_yaml: str
    tokenizer_json: str

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights, read now (not before: they can be large), with LoRA adapters merged into the weights they
        adapted (they fit the model of ``plain_config``)."""
        return without_lora(load_file(str(self.path)), self.config_yaml)[0]

    @property
    def plain_config(self) -> str:
        """The config the weights were trained with, LoRA off: the model ``weights`` fit."""
        return without_lora({}, self.config_yaml)[1]


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
                        "polytrain export RUN_DIR --out FILE, or name the timm model of a timm file (timm_model)")
    return Pretrained(path, metadata["polytrain_config"], metadata["polytrain_tokenizer"])


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


def without_lora(weights: dict[str, torch.Tensor], config_yaml: str) -> tuple[dict[str, torch.Tensor], str]:
    """Weights with LoRA adapters merged, and the config with LoRA off; unchanged when the run had none."""
    tree = yaml.safe_load(config_yaml)
    lora = tree.get("finetune", {}).get("lora", {})
    if not lora.get("rank"):
        return weights, config_yaml
    merged = merge_lora(weights, LoraConfig(**lora).scale)
    lora["rank"] = 0
    return merged, yaml.safe_dump(tree, sort_keys=False)


VOCABULARY_TABLES = ("embedders.text.table.weight", "embedders.text.output_bias", "lm_head.weight", "lm_head.bias")
"""Tensors with one row per text token id: where the run's tokenizer is the checkpoint's plus the special tokens
polytrain adds (after the checkpoint's ids), the checkpoint fills their first rows and the rest start new."""


@dataclass
class Offered:
    """The tensors one checkpoint offers a model, under the model's names."""

    source: str
    """Where they come from, for messages: ``finetune.init_from (runs/pretrain)``."""
    family: str
    """``polytrain``, or the library class of the checkpoint (``LlamaForCausalLM``, ``timm``)."""
    parts: list[str]
    """The parts of the model they fill ([]: whatever shares a name with the checkpoint)."""
    tensors: dict[str, torch.Tensor]
    ignored: list[str]
    """The checkpoint's tensors left out (another task's head, an embedder the run has no use for)."""
    tokenizer: bool = True
    """The run's text tokenizer is this checkpoint's (plus tokens the run added after its ids, such as a new
    modality's span markers): its vocabulary tables may have fewer rows than the model's (``VOCABULARY_TABLES``)."""


def by_name(source: str, weights: dict[str, torch.Tensor], own: set[str]) -> Offered:
    """A polytrain checkpoint's ``weights`` offered by name to a model whose state-dict names are ``own``."""
    return Offered(source, "polytrain", [], {name: t for name, t in weights.items() if name in own},
                   [name for name in weights if name not in own])


@dataclass
class SourceReport:
    source: str
    family: str
    parts: list[str]
    loaded: list[str]
    ignored: list[str]
    extended: dict[str, str]
    """Vocabulary tables the model has more rows of: their first rows loaded, which rows are new."""

    def summary(self) -> str:
        into = f" into {', '.join(self.parts)}" if self.parts else ""
        extended = f"; vocabulary extended: {', '.join(self.extended)}" if self.extended else ""
        return (f"{self.source}: loaded {len(self.loaded)} tensors{into}, ignored {len(self.ignored)}: "
                f"{', '.join(self.ignored) or '-'}{extended}")


@dataclass
class InitReport:
    """What ``load_initial_weights`` did, tensor by tensor and checkpoint by checkpoint."""

    sources: list[SourceReport]
    new: list[str]
    """In the model, from no checkpoint: left as initialized (glue between parts, a new modality's embedder)."""

    @property
    def loaded(self) -> list[str]:
        return [name for source in self.sources for name in source.loaded]

    @property
    def ignored(self) -> list[str]:
        """In a checkpoint, not taken (e.g. a pretraining task's own head)."""
        return [name for source in self.sources for name in source.ignored]

    @property
    def extended(self) -> list[str]:
        return [name for source in self.sources for name in source.extended]

    def write(self, run_dir: RunDir) -> None:
        report = {"loaded": self.loaded, "new": self.new, "ignored": self.ignored, "extended": self.extended,
                  "sources": [source.__dict__ for source in self.sources]}
        atomic.write_text(run_dir.init_report, json.dumps(report, indent=1) + "\n")

    def summary(self) -> str:
        """One log line; LoRA adapters (always new) are counted rather than listed."""
        new = [name for name in self.new if not is_adapter(name)]
        adapters = f" and {len(self.new) - len(new)} LoRA adapter tensors" if len(new) < len(self.new) else ""
        return (f"init_from {'; '.join(map(SourceReport.summary, self.sources))}; newly initialized {len(self.new)}: "
                f"{', '.join(new) or '-'}{adapters} (full lists in init_from.json)")


def load_initial_weights(model: nn.Module, offers: list[Offered]) -> InitReport:
    """Copy each checkpoint's offered tensors into ``model``; a shape mismatch stops with the tensor's name and both
    shapes, after every mismatch of the checkpoint is known."""
    own = model.state_dict()
    reports = []
    for offer in offers:
        if not offer.tensors:
            raise DataError(f"init_from: {offer.source} shares no tensor name with this model; it is not a polytrain "
                            f"checkpoint of this kind of model (its tensors look like {', '.join(offer.ignored[:3])})")
        extended = {name: f"rows {len(t)}..{len(own[name]) - 1} new (the tokens the run's tokenizer added)"
                    for name, t in offer.tensors.items() if offer.tokenizer and grows(name, t, own[name])}
        mismatched = [f"{name}: {offer.source} has {tuple(t.shape)}, the model {tuple(own[name].shape)}"
                      for name, t in offer.tensors.items() if t.shape != own[name].shape and name not in extended]
        if mismatched:
            raise DataError(f"init_from: tensor shapes differ, so the checkpoint was trained with another architecture "
                            f"(configure the model as it was): {'; '.join(mismatched[:3])}"
                            + (f" and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""))
        with torch.no_grad():
            for name, tensor in offer.tensors.items():
                own[name][: len(tensor)].copy_(tensor)
        reports.append(SourceReport(offer.source, offer.family, offer.parts, list(offer.tensors), offer.ignored,
                                    extended))
    loaded = {name for report in reports for name in report.loaded}
    return InitReport(reports, [name for name in own if name not in loaded])


def grows(name: str, theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    """Whether ``theirs`` is the first rows of vocabulary tensor ``ours``."""
    return name in VOCABULARY_TABLES and theirs.shape[1:] == ours.shape[1:] and len(theirs) < len(ours)
