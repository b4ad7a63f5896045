"""``polytrain export``: a run's model as one safetensors file of polytrain's (``--out FILE``), or as a Hugging Face
or timm checkpoint (``--format hf|timm --out DIR``).

Either way the whole fp32 weights come from the latest checkpoint, ZeRO shards merged from their fp32 master copies
and LoRA folded in (``consolidated``).  polytrain's file carries the config and tokenizer in its metadata. For a
library, the run's whole fp32 weights (ZeRO shards merged, LoRA folded in) are rebuilt into its model, and the first
library class that expresses it writes the folder: the families of the checkpoints the run started from (its
``init_from.json``) first, then every family of the format whose head one of the run's tasks uses.  A model
no class expresses (an encoder with blocks of its own, patch-embedded image spans in a decoder's text, two
tasks' heads) is one error naming the first setting or tensor the class has no place for, said by the class
of the model's shape where there is one (LLaVA's for a run with an image tower).  Parts the exported task never
runs (another task's head, the text embedder of a classifier of images) are left out, and said so.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from polytrain import atomic
from polytrain.config import Config
from polytrain.config.model import head_kind
from polytrain.config.registries import FAMILIES
from polytrain.config.tokenizers import UNK, markers
from polytrain.errors import ConfigError
from polytrain.models.convert import ConversionError, write_external
from polytrain.models.convert.family import Family
from polytrain.models.convert.files import TokenizerFiles
from polytrain.models.convert.rules import NoPlace
from polytrain.models.model import PolyModel
from polytrain.platform.distributed.checkpoint import latest_checkpoint, read_state, safe_unpickling
from polytrain.platform.observe.run_dir import SHARD_TAG
from polytrain.platform.train.init_from import load_weights, without_lora

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


def consolidated(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint's whole fp32 weights, LoRA folded in, and what an export carries beside them: the config
    (with LoRA off, so the weights load into the plain model), the tokenizer and the step.

    ZeRO shards (stage >= 1) are merged from the fp32 master copies in the optimizer shards;
    stage-0 checkpoints already hold whole weights.
    """
    folder = latest_checkpoint(run_dir)
    state = read_state(folder.state)
    if state.get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with safe_unpickling():
            weights = get_fp32_state_dict_from_zero_checkpoint(str(folder.shards), tag=SHARD_TAG)
    else:
        weights = load_file(str(folder.weights))
    weights, config_yaml = without_lora(weights, folder.config.read_text())
    metadata = {"polytrain_config": config_yaml, "polytrain_tokenizer": folder.tokenizer.read_text(),
                "step": str(state["step"])}
    return {name: t.float().contiguous() for name, t in weights.items()}, metadata


def export_model(run_dir: str | Path, out: Path) -> Path:
    """Consolidate a checkpoint (``consolidated``) into one fp32 safetensors file that carries its config and
    tokenizer; also writes the config beside it as ``<out>.yaml``."""
    weights, metadata = consolidated(run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write(out, lambda tmp: save_file(weights, tmp, metadata=metadata))
    atomic.write_text(out.with_suffix(".yaml"), metadata["polytrain_config"])
    return out


def export_library(job, run_dir: str | Path, fmt: str, out: Path) -> tuple[str, str, list[str]]:
    """Write the run's model (``job``: ``polytrain.job.Job.of_run(run_dir)``) as a ``fmt`` checkpoint folder at
    ``out``; the family and task it was written as, and the parts left out (``unused``)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"must be polytrain, {' or '.join(FORMATS)}")
    cfg, tokenizers = job.cfg, job.tokenizers
    model, _ = job.build_model()
    load_weights(model, Path(run_dir), consolidated(run_dir)[0])
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
