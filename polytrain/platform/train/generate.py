"""``polytrain generate``: continue new inputs with a trained run, as one sample given on the command line
(``--image a.png --text "Which digit is it?"``, its segments in order) or every sample of a manifest.

The run's decoding settings (``model.heads.decoding``) apply unless ``key=value`` overrides change them;
``max_new_tokens`` defaults to the task's ``max_target_len``.
"""

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from polytrain.config.model import DecodingConfig, head_kind
from polytrain.errors import ConfigError, DataError
from polytrain.platform.data.datasets import SequenceDataset
from polytrain.platform.data.manifest import Part, Record, read_manifest
from polytrain.platform.train.evaluate import generate
from polytrain.schema import from_dict

BATCH = 16
"""Manifest samples continued together."""


def generate_command(job, run_dir: str, segments: list[tuple[str, str]], manifest: str | None, task: str | None,
                     overrides: list[str]) -> int:
    """Continue the samples with the trained model of ``job`` (``polytrain.job.Job.of_run(run_dir)``)."""
    if bool(segments) == bool(manifest):
        raise ConfigError("generate", segments or manifest, "give the sample's segments (--image, --audio, --text, "
                          "--segment) or --manifest, one of the two")
    cfg, tokenizers = job.cfg, job.tokenizers
    name = generating_task(cfg, task, {modality for modality, _ in segments if modality != "text"} if segments
                           else None)
    decoding, max_new_tokens = settings(cfg.model.heads.decoding, overrides, cfg.data.tasks[name].max_target_len)
    records = (read_manifest(Path(manifest), name, cfg.data.skip_bad_samples,
                             plain_text_scored=False) if manifest else [command_line_sample(segments)])
    dataset = SequenceDataset(records, name, cfg.data.tasks[name], tokenizers, skip_bad=False)
    check_modalities(records, cfg.data.tasks[name].modalities, name, run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = job.trained_model().to(device).eval()
    for start in range(0, len(records), BATCH):
        chunk = records[start: start + BATCH]
        batch = dataset.prompts(chunk).to(device)
        texts = generate(model.heads[name], model, batch, tokenizers["text"], max_new_tokens, decoding)
        for record, continuation in zip(chunk, texts):
            reference = f"\t(reference: {record.scored_text})" if record.scored_text else ""
            print(continuation if not manifest else f"{record.sample_id}\t{continuation}{reference}", flush=True)
    return 0


def generating_task(cfg, task: str | None, modalities: set[str] | None = None) -> str:
    """The task whose head continues text: the one named, the run's only one, or the only one that reads exactly
    the non-text ``modalities`` of the sample given on the command line."""
    generating = [name for name, t in cfg.data.tasks.items() if head_kind(t.head).generates]
    if task is not None:
        if task not in cfg.data.tasks:
            raise ConfigError("--task", task, f"the run has no such task; its tasks: {', '.join(cfg.data.tasks)}")
        if task not in generating:
            raise ConfigError("--task", task, f"head {cfg.data.tasks[task].head} does not generate text; tasks that "
                              f"do: {', '.join(generating) or 'none'}")
        return task
    if not generating:
        raise ConfigError("--task", None, "the run was trained without a head that generates text (decoder_only or "
                          "encoder_decoder)")
    if len(generating) > 1 and modalities is not None:
        reading = [name for name in generating if set(cfg.data.tasks[name].modalities) == modalities]
        generating = reading if len(reading) == 1 else generating
    if len(generating) > 1:
        raise ConfigError("--task", None, f"the run has {len(generating)} tasks whose heads generate text "
                          f"({', '.join(generating)}); name one with --task")
    return generating[0]


def settings(decoding: DecodingConfig, overrides: list[str], max_target_len: int) -> tuple[DecodingConfig, int]:
    """The decoding settings with ``key=value`` overrides, and the most tokens to generate."""
    tree: dict[str, Any] = dataclasses.asdict(decoding)
    max_new_tokens = max_target_len + 1
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError("override", item, "must look like key=value, e.g. strategy=beam")
        value = yaml.safe_load(raw)
        if key == "max_new_tokens":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError("max_new_tokens", value, "must be an integer >= 1")
            max_new_tokens = value
            continue
        tree[key.removeprefix("model.heads.decoding.").removeprefix("decoding.")] = value
    return from_dict(DecodingConfig, tree, "model.heads.decoding"), max_new_tokens


def command_line_sample(segments: list[tuple[str, str]]) -> Record:
    """The sample ``--image/--audio/--text/--segment`` describe; file paths relative to the working directory."""
    parts = []
    for modality, value in segments:
        if modality == "text":
            if not value:
                raise DataError("--text: empty text")
            parts.append(Part("text", value))
            continue
        path = Path(value).absolute()
        if not path.is_file():
            raise DataError(f"--{modality} {value}: no such file")
        parts.append(Part(modality, str(path)))
    return Record(tuple(parts), None, "command line", "the command line")


def check_modalities(records: list[Record], known: tuple[str, ...], task: str, run_dir: str) -> None:
    for record in records:
        for part in record.parts:
            if part.modality != "text" and part.modality not in known:
                raise DataError(f"{record.where}: a {part.modality} segment, but task {task} of {run_dir} was trained "
                                f"on {', '.join(known) or 'text only'}")
