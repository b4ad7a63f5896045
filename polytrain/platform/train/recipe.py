"""From a ``Config`` to concrete parts: manifests, tokenizers, datasets, model. Shared by train and eval."""

from pathlib import Path
from typing import Any, Iterator

from polytrain.config import Config
from polytrain.models.model import PolyModel
from polytrain.errors import DataError
from polytrain.models.config import head_kind
from polytrain.platform.data.builtin import PREPARED_PREFIX, SPLITS, resolve_manifest
from polytrain.platform.data.datasets import build_dataset
from polytrain.platform.data.manifest import iter_manifest
from polytrain.platform.data.prepare import Builder, prepare_split, shard_builder
from polytrain.platform.data.shards import TOKENIZER_FILE, is_prepared
from polytrain.platform.train.finetune import adapt
from polytrain.tokenizers.config import BUILT_IN, build_patch_tokenizer
from polytrain.tokenizers.text import TextTokenizer


def manifest(cfg: Config, task: str, split: str) -> Path:
    """The manifest file of ``task``'s ``split`` (train or val), building built-in data on first use."""
    return resolve_manifest(getattr(cfg.data.tasks[task], split), cfg.data.cache_dir)


def tokenizer_corpus(cfg: Config) -> Iterator[str]:
    """Every training string the text tokenizer will meet: documents, prompts, targets, class names."""
    for name, task in cfg.data.tasks.items():
        yield from task.classes
        for record in iter_manifest(manifest(cfg, name, "train"), name, cfg.data.skip_bad_samples):
            yield from (str(part.value) for part in record.parts if part.modality == "text")


def plugin_modalities(cfg: Config) -> tuple[str, ...]:
    """The run's modalities whose span markers the text tokenizer adds to its built-in ones."""
    return tuple(m for m in cfg.data.modalities if m not in BUILT_IN)


def train_text_tokenizer(cfg: Config, out_dir: Path) -> Path:
    """Train byte-level BPE on the run's training text; returns the saved ``tokenizer.json``."""
    return TextTokenizer.train(tokenizer_corpus(cfg), cfg.tokenizers.text, plugin_modalities(cfg)).save(out_dir)


def build_tokenizers(cfg: Config, text_tokenizer_file: Path) -> dict[str, Any]:
    """The text tokenizer (``tokenizer.json`` with ``tokenizers.text``'s settings, plus the special tokens the tasks
    use where it lacks them) and one tokenizer per non-text modality the tasks read."""
    masked = any(head_kind(task.head).layout == "masked" for task in cfg.data.tasks.values())
    text = TextTokenizer.load(text_tokenizer_file, cfg=cfg.tokenizers.text, modalities=cfg.data.span_modalities,
                              masked=masked)
    return {"text": text, **{m: build_patch_tokenizer(m, cfg.tokenizers) for m in cfg.data.modalities}}


def build_datasets(cfg: Config, split: str, tokenizers: dict[str, Any]) -> dict[str, Any]:
    return {name: build_dataset(task, manifest(cfg, name, split), name, tokenizers, cfg.data.skip_bad_samples,
                                Path(cfg.data.cache_dir), augment=split == "train")
            for name, task in cfg.data.tasks.items()}


def prepared_tokenizer(cfg: Config) -> Path | None:
    """The ``tokenizer.json`` of the first prepared split a task reads (its text is already ids of it), if any."""
    for name in cfg.data.tasks:
        for split in SPLITS:
            folder = manifest(cfg, name, split)
            if is_prepared(folder):
                return folder / TOKENIZER_FILE
    return None


def prepare_data(cfg: Config, out: Path, workers: int, shard_records: int) -> list[str]:
    """Prepare every task's train and val data (``prepare.py``) into ``out/<task>/<split>``, text encoded with
    the recipe's tokenizer (``tokenizers.text.path``, a prepared split's, or one trained now on the training
    text and saved as ``out/tokenizer.json``). Returns the overrides that point the recipe at the result."""
    tokenizer_file = Path(cfg.tokenizers.text.path) if cfg.tokenizers.text.path else prepared_tokenizer(cfg)
    if tokenizer_file is None:
        tokenizer_file = out / TOKENIZER_FILE
        if not tokenizer_file.is_file():  # a continued prepare keeps the tokenizer it began with
            train_text_tokenizer(cfg, out)
    text = build_tokenizers(cfg, tokenizer_file)["text"]
    with shard_builder(text, workers) as build:
        return [prepare_task_split(cfg, name, split, text, out, build, shard_records)
                for name in cfg.data.tasks for split in SPLITS if not is_prepared(manifest(cfg, name, split))]


def prepare_task_split(cfg: Config, name: str, split: str, text: TextTokenizer, out: Path, build: Builder,
                       shard_records: int) -> str:
    """Prepare one manifest of the recipe; returns the override that names the result."""
    source = manifest(cfg, name, split)
    if not source.is_file():
        raise DataError(f"{source}: manifest not found (data.tasks.{name}.{split})")
    stat = source.stat()
    records = iter_manifest(source, name, cfg.data.skip_bad_samples,
                            plain_text_scored=head_kind(cfg.data.tasks[name].head).layout == "causal")
    described = {"manifest": str(source.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "task": name}
    prepare_split(records, out / name / split, text, described, build, shard_records, cfg.data.skip_bad_samples)
    return f"data.tasks.{name}.{split}={PREPARED_PREFIX}{out / name / split}"


def task_heads(cfg: Config) -> dict[str, str]:
    """The head of every task."""
    return {name: task.head for name, task in cfg.data.tasks.items()}


def build_model(cfg: Config, tokenizers: dict[str, Any]) -> PolyModel:
    """The model the config describes, LoRA adapters included (weights as initialized)."""
    specs = [tok.embed_spec() for tok in tokenizers.values()]
    model = PolyModel(cfg.model, specs, task_heads(cfg),
                      {name: len(task.classes) for name, task in cfg.data.tasks.items() if task.classes})
    adapt(model, cfg.finetune)
    return model
