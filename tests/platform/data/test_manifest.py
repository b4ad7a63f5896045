"""Manifests: samples as ordered segments, the short forms meaning what they always meant, every bad line named."""

import json
import logging

import pytest

from polytrain.errors import DataError
from polytrain.platform.data.manifest import Part, read_manifest


def write_manifest(path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_segments_keep_their_order_modalities_and_scores(tmp_path):
    write_manifest(tmp_path / "m.jsonl", [
        {"segments": [{"image": "a.png"}, {"text": "Which digit?"}, {"text": "seven", "scored": True}], "id": "q1"},
        {"segments": [{"image": "a.png"}, {"image": "/abs/b.png"}, {"text": "two sevens", "scored": True}]},
        {"segments": [{"audio": "s.wav"}], "label": "seven"}])
    first, second, third = read_manifest(tmp_path / "m.jsonl", "t", False)
    assert first.parts == (Part("image", str(tmp_path / "a.png")), Part("text", "Which digit?"),
                           Part("text", "seven", scored=True))
    assert first.sample_id == "q1" and first.scored_text == "seven"
    assert [p.value for p in second.parts[:2]] == [str(tmp_path / "a.png"), "/abs/b.png"]
    assert second.sample_id == f"{tmp_path / 'm.jsonl'}:2"
    assert third.parts == (Part("audio", str(tmp_path / "s.wav")),) and third.label == "seven"


def test_short_forms_mean_what_they_meant(tmp_path):
    write_manifest(tmp_path / "m.jsonl", [{"text": "def f(): pass"}, {"image": "i.png", "target": "seven"},
                                          {"text": "good morning", "target": "bonjour"}])
    lm, caption, translate = read_manifest(tmp_path / "m.jsonl", "t", False)
    assert lm.parts == (Part("text", "def f(): pass", scored=True),)  # a document: all of it is modeled
    assert caption.parts == (Part("image", str(tmp_path / "i.png")), Part("text", "seven", scored=True))
    assert translate.parts == (Part("text", "good morning"), Part("text", "bonjour", scored=True))
    unscored = read_manifest(tmp_path / "m.jsonl", "t", False, plain_text_scored=False)[0]
    assert unscored.parts == (Part("text", "def f(): pass"),)  # for a classifier or masked LM: an input


def test_task_field_routes_lines(tmp_path):
    write_manifest(tmp_path / "m.jsonl", [{"text": "a", "task": "lm"}, {"text": "b", "task": "other"}, {"text": "c"}])
    assert [r.parts[0].value for r in read_manifest(tmp_path / "m.jsonl", "lm", False)] == ["a", "c"]


@pytest.mark.parametrize("line, fragment", [
    ("{broken json", "not valid JSON"),
    ('{"txt": "typo"}', r"unknown field\(s\) \['txt'\]"),
    ("[1, 2]", "a manifest line must be a JSON object"),
    ('{"segments": [{"image": "a.png", "scored": true}]}', "segment 0: a scored segment must be text"),
    ('{"segments": [{"text": "a", "image": "b.png"}]}', "segment 0: a segment holds exactly one of"),
    ('{"segments": [{"text": "a", "scored": "yes"}]}', "scored must be true or false"),
    ('{"segments": []}', "segments must be a non-empty list"),
    ('{"segments": [{"text": "a"}], "text": "b"}', "either as segments or as fields"),
    ('{"segments": [{"text": ""}]}', "text must be a non-empty string"),
    ('{"image": "a.png", "audio": "b.wav", "target": "x"}', "one file modality per line in the short form"),
    ('{"image": 3, "target": "x"}', "image must be a file path, got 3"),
    ('{"id": "lonely"}', "no sample in the line"),
    ('{"text": "\\ud800"}', "is not valid Unicode"),
])
def test_a_bad_line_names_the_manifest_and_line(tmp_path, line, fragment):
    (tmp_path / "m.jsonl").write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=rf"{tmp_path / 'm.jsonl'}:3: .*{fragment}"):
        read_manifest(tmp_path / "m.jsonl", "t", skip_bad=False)


def test_a_line_that_is_not_utf8_is_a_data_error_or_a_counted_skip(tmp_path, caplog):
    (tmp_path / "m.jsonl").write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"m.jsonl:2: not UTF-8 text \(byte 13 of the line is 0xe9\)"):
        read_manifest(tmp_path / "m.jsonl", "t", skip_bad=False)
    with caplog.at_level(logging.WARNING):
        records = read_manifest(tmp_path / "m.jsonl", "t", skip_bad=True)
    assert [r.parts[0].value for r in records] == ["a", "b"] and "skipped 1 bad line(s)" in caplog.text


def test_bad_lines_are_skipped_counted_and_logged_when_asked(tmp_path, caplog):
    write_manifest(tmp_path / "m.jsonl", [{"text": "a"}, "not json", {"text": "b"}, "{", {"text": "c"}])
    with caplog.at_level(logging.WARNING):
        records = read_manifest(tmp_path / "m.jsonl", "lm", skip_bad=True)
    assert [r.parts[0].value for r in records] == ["a", "b", "c"]
    assert "skipped 2 bad line(s)" in caplog.text and "m.jsonl:2" in caplog.text and "m.jsonl:4" in caplog.text


def test_missing_manifest_and_empty_task(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl", "lm", False)
    write_manifest(tmp_path / "m.jsonl", [{"text": "a", "task": "other"}])
    with pytest.raises(DataError, match="no samples for task 'lm'"):
        read_manifest(tmp_path / "m.jsonl", "lm", False)
