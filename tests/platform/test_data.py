import json
import logging

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from polytrain.errors import DataError
from polytrain.platform.data import (LMDataset, Mixture, Seq2SeqDataset, TaskStream, eval_batches, micro_batches,
                                     read_manifest)
from polytrain.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
from polytrain.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from polytrain.tokenizers.text import TextTokenizer, TextTokenizerConfig
from polytrain.tokens import IGNORE_INDEX


@pytest.fixture(scope="module")
def text() -> TextTokenizer:
    words = ["zero one two three four five six seven eight nine", "def f(x): return x"] * 20
    return TextTokenizer.train(words, TextTokenizerConfig(vocab_size=300, max_len=32))


def write_manifest(path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


@pytest.fixture
def image_set(tmp_path):
    """Six small PNGs and a manifest of them."""
    rows = []
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "target": ["zero", "one"][i % 2], "id": f"img{i}"})
    return tmp_path, rows


def image_dataset(folder, rows, text, skip=False):
    write_manifest(folder / "m.jsonl", rows)
    records = read_manifest(folder / "m.jsonl", "caption", skip)
    return Seq2SeqDataset(records, ImageTokenizer(ImageTokenizerConfig(size=8, patch_size=4, channels=1)), text,
                          max_target_len=4, skip_bad=skip)


def test_manifest_paths_resolve_relative_to_the_manifest(image_set, text):
    folder, rows = image_set
    ds = image_dataset(folder, rows, text)
    sample = ds[3]
    assert sample.sample_id == "img3" and sample.target == "one"
    source, target = sample.values
    assert source.values.shape == (4, 16)
    assert target[0] == text.bos_id and target[-1] == text.eos_id
    assert text.decode(target) == "one"


def test_task_field_routes_lines(tmp_path):
    write_manifest(tmp_path / "m.jsonl", [{"text": "a", "task": "lm"}, {"text": "b", "task": "other"}, {"text": "c"}])
    assert [r.fields["text"] for r in read_manifest(tmp_path / "m.jsonl", "lm", False)] == ["a", "c"]


def test_bad_json_line_names_file_and_line(tmp_path):
    write_manifest(tmp_path / "m.jsonl", [{"text": "ok"}, "", "{broken json", {"text": "fine"}])
    with pytest.raises(DataError, match=rf"{tmp_path / 'm.jsonl'}:3: not valid JSON"):
        read_manifest(tmp_path / "m.jsonl", "lm", skip_bad=False)


def test_unknown_field_and_non_object_lines(tmp_path):
    write_manifest(tmp_path / "a.jsonl", [{"txt": "typo"}])
    with pytest.raises(DataError, match=r"a.jsonl:1: unknown field\(s\) \['txt'\]"):
        read_manifest(tmp_path / "a.jsonl", "lm", False)
    write_manifest(tmp_path / "b.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match="b.jsonl:1: a manifest line must be a JSON object"):
        read_manifest(tmp_path / "b.jsonl", "lm", False)


def test_bad_lines_are_skipped_counted_and_logged_when_asked(tmp_path, caplog):
    write_manifest(tmp_path / "m.jsonl", [{"text": "a"}, "not json", {"text": "b"}, "{", {"text": "c"}])
    with caplog.at_level(logging.WARNING):
        records = read_manifest(tmp_path / "m.jsonl", "lm", skip_bad=True)
    assert [r.fields["text"] for r in records] == ["a", "b", "c"]
    assert "skipped 2 bad line(s)" in caplog.text and "m.jsonl:2" in caplog.text and "m.jsonl:4" in caplog.text


def test_missing_manifest_and_empty_task(tmp_path):
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl", "lm", False)
    write_manifest(tmp_path / "m.jsonl", [{"text": "a", "task": "other"}])
    with pytest.raises(DataError, match="no samples for task 'lm'"):
        read_manifest(tmp_path / "m.jsonl", "lm", False)


def test_missing_or_corrupt_file_names_manifest_line_and_file(image_set, text):
    folder, rows = image_set
    (folder / "2.png").write_bytes(b"garbage")
    rows[4]["image"] = "gone.png"
    ds = image_dataset(folder, rows, text)
    with pytest.raises(DataError, match=rf"m.jsonl:3: {folder / '2.png'}: not a readable image"):
        ds[2]
    with pytest.raises(DataError, match=rf"m.jsonl:5: {folder / 'gone.png'}: image file not found"):
        ds[4]


def test_skip_replaces_a_bad_sample_with_the_next_good_one(image_set, text):
    folder, rows = image_set
    (folder / "2.png").write_bytes(b"garbage")
    sample = image_dataset(folder, rows, text, skip=True)[2]
    assert sample.sample_id == "img3"
    assert len(sample.skipped) == 1 and "2.png" in sample.skipped[0]


def test_error_in_loader_worker_surfaces_as_a_clean_data_error(image_set, text):
    folder, rows = image_set
    (folder / "1.png").write_bytes(b"garbage")
    ds = image_dataset(folder, rows, text)
    mixture = Mixture({"caption": ds}, {"caption": 6}, seed=0, rank=0, world_size=1, pad_id=text.pad_id)
    with pytest.raises(DataError, match=r"m.jsonl:2: .*1.png: not a readable image") as err:
        next(micro_batches(mixture, start=0, num_workers=1))
    assert "Traceback" not in str(err.value)


def test_skipped_samples_are_logged_once_each(image_set, text, caplog):
    folder, rows = image_set
    (folder / "1.png").write_bytes(b"garbage")
    ds = image_dataset(folder, rows, text, skip=True)
    mixture = Mixture({"caption": ds}, {"caption": 6}, seed=0, rank=0, world_size=1, pad_id=text.pad_id)
    batches = micro_batches(mixture, start=0, num_workers=0)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert len(next(batches).tasks["caption"]) == 6
    assert caplog.text.count("skipped bad sample (1 so far)") == 1


def test_audio_samples_pad_into_one_segment(tmp_path, text):
    rows = []
    for i, seconds in enumerate([0.3, 0.6]):
        soundfile.write(tmp_path / f"{i}.wav", np.zeros(int(16000 * seconds), dtype=np.float32) + 0.01, 16000)
        rows.append({"audio": f"{i}.wav", "target": "two"})
    write_manifest(tmp_path / "m.jsonl", rows)
    tok = AudioTokenizer(AudioTokenizerConfig(n_mels=32, patch_mels=16, patch_frames=8))
    ds = Seq2SeqDataset(read_manifest(tmp_path / "m.jsonl", "speech", False), tok, text, 4, False)
    batch = ds.collate([ds[0], ds[1]], text.pad_id)
    short, long = (len(ds[i].values[0]) for i in range(2))
    assert batch.source.values.shape == (2, long, 128)
    assert batch.source.mask.sum(1).tolist() == [short, long]
    assert (batch.labels[:, 0] != IGNORE_INDEX).all()


def test_lm_windows_are_contiguous_shifted_and_cover_the_stream(tmp_path, text):
    write_manifest(tmp_path / "m.jsonl", [{"text": "def f(x): return x " * 20}, {"text": "zero one two"}])
    ds = LMDataset(read_manifest(tmp_path / "m.jsonl", "lm", False), text, seq_len=8)
    assert len(ds) == (len(ds.tokens) - 1) // 8
    batch = ds.collate([ds[0], ds[1]], text.pad_id)
    assert torch.equal(batch.inputs.values[0, 1:], batch.labels[0, :-1])
    assert batch.labels[0, -1] == batch.inputs.values[1, 0]  # window 1 starts where window 0's labels end
    assert int((ds.tokens == text.eos_id).sum()) == 2  # one eos after each document


@pytest.mark.parametrize("size, world", [(10, 1), (10, 2), (11, 3)])
def test_task_stream_shards_are_disjoint_and_cover_each_epoch(size, world):
    per_rank = size // world
    epoch = [[TaskStream(size, 7, rank, world)[p] for p in range(per_rank)] for rank in range(world)]
    flat = [i for shard in epoch for i in shard]
    assert len(set(flat)) == len(flat) == per_rank * world
    again = [TaskStream(size, 7, 0, world)[p] for p in range(per_rank)]
    assert again == epoch[0]  # a pure function of (seed, position, rank)
    next_epoch = [TaskStream(size, 7, 0, world)[p] for p in range(per_rank, 2 * per_rank)]
    assert next_epoch != epoch[0] or per_rank == 1  # reshuffled


def test_eval_batches_are_ordered_and_limited(image_set, text):
    folder, rows = image_set
    ds = image_dataset(folder, rows, text)
    batches = list(eval_batches(ds, batch_size=4, limit=5, pad_id=text.pad_id))
    assert [b.sample_ids for b in batches] == [["img0", "img1", "img2", "img3"], ["img4"]]
