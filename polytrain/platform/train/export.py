"""``polytrain export RUN_DIR --format hf|timm --out DIR``: a run's model as a Hugging Face or timm checkpoint.

The run's whole fp32 weights (ZeRO shards merged, LoRA folded in) are rebuilt into its model, and the first
library class that expresses it writes the folder: the families of the checkpoints the run started from (its
``init_from.json``) first, then every family of the format whose head one of the run's tasks uses.  A model
no class expresses (an encoder with blocks of its own, patch-embedded image spans in a decoder's text, two
tasks' heads) is one error naming the first setting or tensor the class has no place for, said by the class
of the model's shape where there is one (LLaVA's for a run with an image tower).  Parts the exported task never
runs (another task's head, the text embedder of a classifier of images) are left out, and said so.
"""

import json
from pathlib import Path

from polytrain.config import Config
from polytrain.errors import ConfigError
from polytrain.models.config import head_kind
from polytrain.models.convert import FAMILIES, ConversionError, write_external
from polytrain.models.convert.family import Family
from polytrain.models.convert.files import TokenizerFiles
from polytrain.models.convert.rules import NoPlace
from polytrain.models.model import PolyModel
from polytrain.platform.distributed.checkpoint import consolidated, latest_checkpoint
from polytrain.platform.train.init_from import rebuilt
from polytrain.tokenizers.config import UNK, markers

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


def export_library(run_dir: str | Path, fmt: str, out: Path) -> tuple[str, str, list[str]]:
    """Write the run's model as a ``fmt`` checkpoint folder at ``out``; the family and task it was written as, and
    the parts left out (``unused``)."""
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
    tokenizer = None if fmt == "timm" else TokenizerFiles(text.hf.to_str(), special_roles(text, model.specs))
    errors = []
    for family, task in candidates:
        left_out = unused(cfg, model, task)
        try:
            check_span_layout(cfg, family, task)
            write_external(model, task, family.name, out, tokenizer, cfg.tokenizers.image.channels, left_out)
            return family.name, task, [part.rstrip(".") for part in left_out]
        except ConversionError as err:
            errors.append(err)
    # a class of the model's shape says what it cannot express; the others only that they are not of its shape
    said = next((err for err in errors if not isinstance(err, NoPlace)), errors[0])
    raise ConversionError(f"polytrain export --format {fmt}: {said}")


def special_roles(text, specs) -> dict[str, tuple[str, int]]:
    """The text tokenizer's special tokens by role, those it has: bos, eos, pad, mask, unk, and each modality's
    slot token (``<image>``) by the modality's name."""
    roles = {"bos": (text.cfg.bos, text.bos_id), "eos": (text.cfg.eos, text.eos_id), "pad": (text.cfg.pad, text.pad_id),
             "mask": (text.cfg.mask, text.mask_id), "unk": (UNK, text.unk_id),
             **{m: (markers(m)[0], text.hf.token_to_id(markers(m)[0])) for m in specs if m != "text"}}
    return {role: (token, i) for role, (token, i) in roles.items() if i is not None}


def check_span_layout(cfg: Config, family: Family, task: str) -> None:
    """A class that reads spans as one modality token per vector, causally (LLaVA), writes a run laid out so."""
    if not family.span_slots:
        return
    if cfg.tokenizers.text.span_markers:
        raise ConversionError(f"{family.name} reads one image token per image feature and no markers; the run laid "
                              "its spans out between markers (set tokenizers.text.span_markers: false)")
    if cfg.data.tasks[task].span_attention != "causal":
        raise ConversionError(f"{family.name} attends causally over image tokens; task {task!r} attends within its "
                              f"spans both ways (set data.tasks.{task}.span_attention: causal)")


def unused(cfg: Config, model: PolyModel, task: str) -> tuple[str, ...]:
    """Prefixes of the parts ``task`` never runs: the other tasks' heads, the embedders of modalities it does not
    read (text, for a classifier of images alone)."""
    spec = cfg.data.tasks[task]
    named = [spec.source] if isinstance(spec.source, str) else spec.source or []
    text = head_kind(spec.head).text_output or not spec.modalities or "text" in named
    reads = {*spec.modalities, *(("text",) if text else ())}
    return tuple([f"heads.{other}." for other in model.task_heads if other != task]
                 + [f"embedders.{m}." for m in model.specs if m not in reads])
