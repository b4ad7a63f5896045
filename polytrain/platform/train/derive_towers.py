"""What a checkpoint gives a run that takes a modality's embedder from it as a tower (``derive.py`` asks).

The tower's architecture (``config.tower.ARCHITECTURE``: widths, depth, norms,
tokens, its position table) is the checkpoint's, and a recipe key that
contradicts it is an error; how the run uses the tower is the recipe's, with
the checkpoint's own use as the default where it is a whole model that uses
one (LLaVA's feature layer, class token and projector; Whisper's), and the
features' own final norm in every case (timm's, SigLIP's and Whisper's are
normalized, CLIP's tokens are not).  The checkpoint's preprocessing becomes the
modality tokenizer's defaults (image side, resize, mean and std; mel bins,
hop and window, two frames per token); of those its patch, channels and mel
bins are fixed, since its stem's weights are shaped by them.

A polytrain checkpoint whose embedder ``finetune.init_parts`` takes (a stage-2
run continuing stage 1's tower and projector beside the original LM) gives
its saved tower and tokenizer settings the same way (``own_towers``).
"""

from typing import Any

from polytrain.config import config_from_yaml
from polytrain.config.tower import ARCHITECTURE, USE
from polytrain.models.convert.external import ExternalCheckpoint
from polytrain.schema import to_dict

FIXED_TOKENIZER_KEYS = ("patch_size", "channels", "frontend", "n_mels", "patch_mels", "patch_frames")
"""Tokenizer settings a tower's stem is shaped by; the others (image side, mean and std, the longest clip) the
recipe may change."""


def tower_settings(checkpoint: ExternalCheckpoint, modality: str) -> dict[str, Any]:
    """The config values (dotted keys) that taking ``modality``'s embedder from ``checkpoint`` as a tower gives."""
    arch = checkpoint.architecture
    tower = arch.model.towers[modality]
    use = USE if arch.head else ("final_norm",)  # a whole model's own use of its tower, else only its norm
    settings = {f"model.towers.{modality}.{key}": getattr(tower, key) for key in (*ARCHITECTURE, *use)
                if key != "dropout"}
    settings.update({f"tokenizers.{modality}.{key}": value
                     for key, value in checkpoint.preprocessing.get(modality, {}).items()})
    return settings


def fixed(key: str) -> bool:
    """Whether a key ``tower_settings`` gives is the checkpoint's to fix (a recipe that contradicts it is wrong), not
    a default the recipe may change."""
    section, _, rest = key.partition(".")
    name = rest.rpartition(".")[2]
    if section == "tokenizers":
        return name in FIXED_TOKENIZER_KEYS
    return not key.startswith("model.towers.") or name in ARCHITECTURE


def read_as_towers(checkpoint: ExternalCheckpoint, parts: list[str], towers: set[str]) -> ExternalCheckpoint:
    """``checkpoint`` read as towers of the ``towers`` modalities whose embedders it fills (``parts``, or all it has
    where none are named): a plain ViT classifier under a run that takes its image embedder as a tower."""
    named = {part.partition(".")[2] for part in parts if part.startswith("embedders.")}
    return checkpoint.as_towers(towers & named if parts else towers)


def own_towers(sources: list) -> dict:
    """The config tree (``model.towers``, ``tokenizers``) of the towers polytrain checkpoints hand the run through
    ``finetune.init_parts`` (their ``embedders.<modality>`` parts), as their runs saved them; ``sources``: the
    run's checkpoints, opened (``sources.Source``)."""
    tree: dict = {}
    for source in sources:
        modalities = [part.partition(".")[2] for part in source.parts if part.startswith("embedders.")]
        if source.pretrained is None or not modalities:
            continue  # another library's (derive.py reads it), or no embedder taken
        saved = config_from_yaml(source.pretrained.config_yaml, source.name)
        for modality in modalities:
            if modality in saved.model.towers:
                tree.setdefault("model", {}).setdefault("towers", {})[modality] = to_dict(saved.model.towers[modality])
                tree.setdefault("tokenizers", {})[modality] = to_dict(saved.tokenizers.section(modality))
    return tree
