"""``polytrain export RUN_DIR --format hf|timm --out DIR``: a run's model as a Hugging Face or timm checkpoint.

The run's whole fp32 weights (ZeRO shards merged, LoRA folded in) are rebuilt into its model, and the first
library class that expresses it writes the folder: the families of the checkpoints the run started from (its
``init_from.json``) first, then every family of the format whose head one of the run's tasks uses.  A model
no class expresses (an encoder with blocks of its own, image spans in a decoder's text, two tasks' heads) is
one error naming the first setting or tensor the class has no place for.
"""

import json
from pathlib import Path

from polytrain.errors import ConfigError
from polytrain.models.convert import FAMILIES, ConversionError, write_external
from polytrain.models.convert.family import Family
from polytrain.models.convert.files import TokenizerFiles
from polytrain.platform.distributed.checkpoint import consolidated, latest_checkpoint
from polytrain.platform.train.init_from import rebuilt
from polytrain.tokenizers.config import UNK

FORMATS = ("hf", "timm")
"""Library formats ``polytrain export --format`` writes (besides polytrain's own safetensors file)."""


def families(fmt: str) -> list[Family]:
    """The families of a format, each once, in registry order."""
    found = {id(family): family for family in map(FAMILIES.get, FAMILIES.names())
             if (family.name == "timm") == (fmt == "timm")}
    return list(found.values())


def started_from(run_dir: str | Path) -> list[str]:
    """The families of the checkpoints the run started from, as its ``init_from.json`` records them."""
    report = latest_checkpoint(run_dir).run.init_report
    if not report.is_file():
        return []
    return [source["family"] for source in json.loads(report.read_text()).get("sources", [])]


def export_library(run_dir: str | Path, fmt: str, out: Path) -> tuple[str, str]:
    """Write the run's model as a ``fmt`` checkpoint folder at ``out``; the (family, task) it was written as."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"must be polytrain, {' or '.join(FORMATS)}")
    weights, metadata = consolidated(run_dir)
    cfg, tokenizers, model = rebuilt(weights, metadata["polytrain_config"], metadata["polytrain_tokenizer"],
                                     Path(run_dir))
    preferred = started_from(run_dir)
    ordered = sorted(families(fmt), key=lambda f: preferred.index(f.name) if f.name in preferred else len(preferred))
    candidates = [(family, task) for family in ordered for task, head in model.task_heads.items()
                  if head == family.head]
    if not candidates:
        raise ConversionError(f"no task of {run_dir} has a head a {fmt} checkpoint holds: its tasks use "
                              f"{', '.join(sorted(set(model.task_heads.values())))}, {fmt} holds "
                              f"{', '.join(sorted({f.head for f in ordered}))}")
    text = tokenizers["text"]
    tokenizer = None if fmt == "timm" else TokenizerFiles(text.hf.to_str(), {
        "bos": (text.cfg.bos, text.bos_id), "eos": (text.cfg.eos, text.eos_id), "pad": (text.cfg.pad, text.pad_id),
        "mask": (text.cfg.mask, text.mask_id), "unk": (UNK, text.unk_id)})
    errors = []
    for family, task in candidates:
        try:
            write_external(model, task, family.name, out, tokenizer, cfg.tokenizers.image.channels)
            return family.name, task
        except ConversionError as err:
            errors.append(err)
    raise ConversionError(f"polytrain export --format {fmt}: {errors[0]}")
