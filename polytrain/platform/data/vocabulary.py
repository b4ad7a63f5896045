"""The text tokenizer a run trains on its own data, trained once per data and settings.

Byte-level BPE learns from every training string the run's tokenizer will meet (documents, prompts, targets,
class names).  The result is kept under ``data.cache_dir/tokenizers/<key>/tokenizer.json``, the key a digest of
what it was trained from (each training manifest's path, size and modification time, the class names, the
tokenizer settings that shape training, the span markers of plugin modalities), so ``plan``, ``data prepare``,
``launch`` and every process of a job find the same file.  A file lock lets the first process train while the
others wait for it.
"""

import fcntl
import hashlib
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from polytrain import atomic
from polytrain.config import Config
from polytrain.platform.data.builtin import Manifests
from polytrain.platform.data.manifest import iter_manifest
from polytrain.platform.data.shards import TOKENIZER_FILE, is_prepared
from polytrain.tokenizers.text import TextTokenizer

log = logging.getLogger(__name__)

TRAINING_SETTINGS = ("vocab_size", "min_frequency", "pad", "bos", "eos", "mask")
"""The ``tokenizers.text`` keys that change what training makes."""


def training_text(cfg: Config, manifests: Manifests) -> Iterator[str]:
    """Every training string the text tokenizer will meet: documents, prompts, targets, class names."""
    for name, task in cfg.data.tasks.items():
        yield from task.classes
        for record in iter_manifest(manifests[name]["train"], name, cfg.data.skip_bad_samples):
            yield from (str(part.value) for part in record.parts if part.modality == "text")


def prepared_tokenizer(manifests: Manifests) -> Path | None:
    """The ``tokenizer.json`` of the first prepared split a task reads (its text is already ids of it), if any."""
    return next((folder / TOKENIZER_FILE for splits in manifests.values() for folder in splits.values()
                 if is_prepared(folder)), None)


def trained_tokenizer(cfg: Config, manifests: Manifests) -> Path:
    """The ``tokenizer.json`` trained on the run's training text (``manifests``) with ``tokenizers.text``'s
    settings: from the cache when this data and these settings trained one before, else trained now and cached."""
    out = Path(cfg.data.cache_dir) / "tokenizers" / training_key(cfg, manifests) / TOKENIZER_FILE
    if out.is_file():
        return out
    with locked(out.parent):
        if not out.is_file():  # another process may have trained it while this one waited
            began = time.perf_counter()
            trained = TextTokenizer.train(training_text(cfg, manifests), cfg.tokenizers.text, cfg.data.plugin_modalities)
            atomic.write_text(out, trained.hf.to_str())
            log.info("trained the text tokenizer in %.1f s (%s)", time.perf_counter() - began, out)
    return out


def training_key(cfg: Config, manifests: Manifests) -> str:
    """A digest of what training the tokenizer reads: the manifests (path, size, mtime), classes and settings."""
    text = cfg.tokenizers.text
    described = {"settings": {key: getattr(text, key) for key in TRAINING_SETTINGS},
                 "modalities": cfg.data.plugin_modalities, "tasks": {}}
    for name, task in cfg.data.tasks.items():
        source = manifests[name]["train"]
        stat = source.stat() if source.is_file() else None
        described["tasks"][name] = {"manifest": str(source.resolve()), "classes": task.classes,
                                    "bytes": stat and stat.st_size, "mtime_ns": stat and stat.st_mtime_ns}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def locked(folder: Path):
    """Hold an exclusive lock on ``folder/.lock`` (created with the folder): one process at a time inside."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
