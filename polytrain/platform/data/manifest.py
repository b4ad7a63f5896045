"""Manifests: JSONL files of samples, one per line, read and checked with the file and line of every mistake.

Manifest format (JSONL, one sample per line, UTF-8)::

    {"text": "def f():\\n    return 1\\n"}                          decoder-only (LM) sample
    {"image": "imgs/0001.png", "target": "seven"}                  image -> text
    {"audio": "clips/s03_7.wav", "target": "seven", "id": "s03_7"} audio -> text
    {"text": "good morning", "target": "bonjour"}                  text -> text

Fields: ``text`` (inline string), ``image`` / ``audio`` (file path, relative
to the manifest's folder or absolute; a plugin modality's name works the same
way), ``target`` (text the model must
produce), ``id`` (optional; defaults to ``<manifest>:<line>``) and ``task``
(optional; when present, only the task of that name reads the line, so one
manifest may serve several tasks).  Blank lines are ignored.

A manifest is named in ``data.tasks.<task>.train`` / ``.val`` by path, or as
``builtin:<name>/<split>`` for the embedded datasets (see ``builtin.py``).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polytrain.errors import DataError
from polytrain.tokenizers.config import TOKENIZERS
from polytrain.tokenizers.text import check_unicode

log = logging.getLogger(__name__)

SAMPLE_FIELDS = ("text", "image", "audio", "target", "id", "task")


@dataclass
class Record:
    """One manifest line, parsed."""

    fields: dict[str, Any]
    where: str
    """``<manifest>:<line>``, for messages."""
    base: Path
    """The manifest's folder, against which relative file paths resolve."""

    @property
    def sample_id(self) -> str:
        return str(self.fields.get("id", self.where))

    def path(self, key: str) -> Path:
        value = self.fields[key]
        if not isinstance(value, str) or not value:
            raise DataError(f"{self.where}: field {key!r} must be a file path, got {value!r}")
        path = Path(value)
        return path if path.is_absolute() else self.base / path


def read_manifest(path: Path, task: str, skip_bad: bool) -> list[Record]:
    """The lines of ``path`` meant for ``task``; bad lines raise, or are logged and counted when ``skip_bad``."""
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    records, bad = [], 0
    known = (*SAMPLE_FIELDS, *(m for m in TOKENIZERS.names() if m not in SAMPLE_FIELDS))  # plugin modalities too
    with path.open(encoding="utf-8", errors="strict") as lines:
        for number, line in enumerate(lines, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                fields = parse_line(line, where, known)
            except DataError as err:
                if not skip_bad:
                    raise
                bad += 1
                log.warning("skipping bad manifest line: %s", err)
                continue
            if fields.get("task", task) == task:
                records.append(Record(fields, where, path.parent))
    if bad:
        log.warning("%s: skipped %d bad line(s)", path, bad)
    if not records:
        raise DataError(f"{path}: no samples for task {task!r}")
    return records


def parse_line(line: str, where: str, known: tuple[str, ...]) -> dict[str, Any]:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(fields, dict):
        raise DataError(f"{where}: a manifest line must be a JSON object, got {type(fields).__name__}")
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; known: {', '.join(known)}")
    for key, value in fields.items():  # JSON can spell lone surrogates ("\\ud800"); no tokenizer can take them
        if isinstance(value, str):
            check_unicode(value, f"{where}: field {key!r}")
    return fields
