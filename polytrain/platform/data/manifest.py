"""Manifests: JSONL files of samples, one per line; every mistake is reported with the file and line.

A sample is an ordered list of segments, each one modality, each an input or
a scored target (the text the model is trained to produce)::

    {"segments": [{"image": "a.png"}, {"text": "Which digit?"}, {"text": "seven", "scored": true}]}
    {"segments": [{"image": "a.png"}, {"image": "b.png"}, {"text": "two sevens", "scored": true}]}
    {"segments": [{"audio": "s.wav"}, {"text": "Transcribe:"}, {"text": "seven", "scored": true}], "id": "s3"}
    {"segments": [{"image": "a.png"}], "label": "seven"}                 a classification sample

A segment holds exactly one modality key: ``text`` (inline), ``image``,
``audio`` or a plugin modality's name (a file path, relative to the
manifest's folder or absolute), and optionally ``"scored": true`` (text only).
Lines of the shorter forms mean what they always meant::

    {"text": "def f():\\n    return 1\\n"}              a document (for LM tasks: all of it scored)
    {"image": "imgs/0001.png", "target": "seven"}     [image] [scored text "seven"]
    {"text": "good morning", "target": "bonjour"}     [text] [scored text "bonjour"]

Other fields: ``id`` (optional; defaults to ``<manifest>:<line>``), ``task``
(optional; only the task of that name reads the line, so one manifest may
serve several tasks) and ``label`` (the class name, for classification
tasks).  Blank lines are ignored.  A manifest is named in
``data.tasks.<task>.train`` / ``.val`` by path, or as ``builtin:<name>/<split>``
for the embedded datasets (``builtin.py``).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from polytrain.config.registries import TOKENIZERS
from polytrain.errors import DataError
from polytrain.tokenizers.text import check_unicode

log = logging.getLogger(__name__)

SAMPLE_FIELDS = ("segments", "text", "target", "label", "id", "task")
"""Fields a line may have besides the (file) modalities of the short form."""


@dataclass(frozen=True)
class Part:
    """One segment of a sample: one modality, an input or a scored target."""

    modality: str
    """``text``, ``image``, ``audio`` or a plugin modality's name."""
    value: Any
    """text: the string (or, prepared, its token ids); file modalities: the resolved file path (or, prepared,
    the file's bytes)."""
    scored: bool = False
    """Text the model is trained to produce (its tokens carry the loss)."""


@dataclass(frozen=True)
class Record:
    """One manifest line, parsed."""

    parts: tuple[Part, ...]
    label: str | None
    """The class name (classification tasks)."""
    sample_id: str
    where: str
    """``<manifest>:<line>``, for messages."""

    @property
    def scored_text(self) -> str:
        """The scored parts' text, joined by spaces: what the model should produce."""
        return " ".join(str(part.value) for part in self.parts if part.scored)


def read_manifest(path: Path, task: str, skip_bad: bool, plain_text_scored: bool = True) -> list[Record]:
    """The lines of ``path`` meant for ``task`` (bad lines raise, or are logged and counted with ``skip_bad``).

    ``plain_text_scored``: a line of the plain ``{"text": ...}`` form is one scored text part (a document to
    model); otherwise an input (text to classify, or to reconstruct from masks).
    """
    records = list(iter_manifest(path, task, skip_bad, plain_text_scored))
    if not records:
        raise DataError(f"{path}: no samples for task {task!r}")
    return records


def iter_manifest(path: Path, task: str, skip_bad: bool, plain_text_scored: bool = True) -> Iterator[Record]:
    """``read_manifest`` one line at a time (for manifests too large to hold)."""
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    modalities = tuple(m for m in TOKENIZERS.names() if m != "text")
    bad = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:
                line = decode_line(raw, where)
                if not line.strip():
                    continue
                fields = parse_line(line, where, modalities)
                if fields.get("task", task) != task:
                    continue
                yield Record(parts_of(fields, where, path.parent, modalities, plain_text_scored),
                             None if fields.get("label") is None else str(fields["label"]),
                             str(fields.get("id", where)), where)
            except DataError as err:
                if not skip_bad:
                    raise
                bad += 1
                log.warning("skipping bad manifest line (%d so far): %s", bad, err)
    if bad:
        log.warning("%s: skipped %d bad line(s)", path, bad)


def decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not UTF-8 text (byte {err.start} of the line is {raw[err.start]:#04x})") from None


def parse_line(line: str, where: str, modalities: tuple[str, ...]) -> dict[str, Any]:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(fields, dict):
        raise DataError(f"{where}: a manifest line must be a JSON object, got {type(fields).__name__}")
    known = (*SAMPLE_FIELDS, *modalities)
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise DataError(f"{where}: unknown field(s) {unknown}; known: {', '.join(known)}")
    return fields


def parts_of(fields: dict[str, Any], where: str, base: Path, modalities: tuple[str, ...],
             plain_text_scored: bool) -> tuple[Part, ...]:
    """The line's segments, from the ``segments`` list or the short form."""
    if "segments" in fields:
        clash = sorted(key for key in ("text", "target", *modalities) if key in fields)
        if clash:
            raise DataError(f"{where}: give the sample either as segments or as fields, not both ({clash})")
        segments = fields["segments"]
        if not isinstance(segments, list) or not segments:
            raise DataError(f"{where}: segments must be a non-empty list, got {segments!r}")
        return tuple(segment_part(s, f"{where}: segment {i}", base, modalities) for i, s in enumerate(segments))
    files = [key for key in modalities if key in fields]
    if len(files) > 1:
        raise DataError(f"{where}: one file modality per line in the short form, got {files}; use segments")
    parts = [file_part(files[0], fields[files[0]], where, base)] if files else []
    if "text" in fields:
        parts.append(Part("text", text_value(fields["text"], f"{where}: field 'text'"),
                          scored=plain_text_scored and "target" not in fields and not files))
    if "target" in fields:
        parts.append(Part("text", text_value(fields["target"], f"{where}: field 'target'"), scored=True))
    if not parts:
        raise DataError(f"{where}: no sample in the line: give segments, text, a file ({', '.join(modalities)}) "
                        "or a target")
    return tuple(parts)


def segment_part(segment: Any, where: str, base: Path, modalities: tuple[str, ...]) -> Part:
    if not isinstance(segment, dict):
        raise DataError(f"{where}: a segment is an object such as {{\"text\": \"...\"}}, got {segment!r}")
    keys = [key for key in segment if key != "scored"]
    if len(keys) != 1 or keys[0] not in ("text", *modalities):
        raise DataError(f"{where}: a segment holds exactly one of text, {', '.join(modalities)} (and optionally "
                        f"scored), got {sorted(segment)}")
    scored = segment.get("scored", False)
    if not isinstance(scored, bool):
        raise DataError(f"{where}: scored must be true or false, got {scored!r}")
    modality = keys[0]
    if modality != "text":
        if scored:
            raise DataError(f"{where}: a scored segment must be text (the model produces text), got {modality}")
        return file_part(modality, segment[modality], where, base)
    return Part("text", text_value(segment["text"], where), scored)


def text_value(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: text must be a non-empty string, got {value!r}")
    check_unicode(value, where)  # JSON can spell lone surrogates ("\\ud800"); no tokenizer can take them
    return value


def file_part(modality: str, value: Any, where: str, base: Path) -> Part:
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: {modality} must be a file path, got {value!r}")
    path = Path(value)
    return Part(modality, str(path if path.is_absolute() else base / path))
