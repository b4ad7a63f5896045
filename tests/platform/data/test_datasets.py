import json
import logging

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from polytrain.errors import DataError
from polytrain.platform.data.datasets import LMDataset, Seq2SeqDataset
from polytrain.platform.data.loader import Mixture, eval_batches, micro_batches
from polytrain.platform.data.manifest import read_manifest
from polytrain.platform.data.order import DataOrder, StreamState
from polytrain.tokenizers.audio import AudioTokenizer
from polytrain.tokenizers.config import AudioTokenizerConfig, ImageTokenizerConfig, TextTokenizerConfig
from polytrain.tokenizers.image import ImageTokenizer
from polytrain.tokenizers.text import TextTokenizer
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
    with pytest.raises(DataError, match=r"m.jsonl:2: .*1.png: not a readable image") as err:
        next(micro_batches(Mixture({"caption": ds}, text.pad_id), one_task_slots(len(ds), 6), num_workers=1))
    assert "Traceback" not in str(err.value)


def test_skipped_samples_are_logged_once_each(image_set, text, caplog):
    folder, rows = image_set
    (folder / "1.png").write_bytes(b"garbage")
    ds = image_dataset(folder, rows, text, skip=True)
    batches = micro_batches(Mixture({"caption": ds}, text.pad_id), one_task_slots(len(ds), 6), num_workers=0)
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


def one_task_slots(size: int, batch: int):
    return DataOrder({"caption": size}, {"caption": batch}, "fixed", seed=0).slots(StreamState(), 0, 1)


def stream(schedule: DataOrder, start: StreamState, rank: int, world: int, n: int) -> list:
    slots = schedule.slots(start, rank, world)
    return [next(slots) for _ in range(n)]


def test_each_epoch_is_a_permutation_then_reshuffled():
    schedule = DataOrder({"a": 7}, {"a": 1}, "fixed", seed=3)
    first, second = ([schedule.index("a", p) for p in range(e * 7, (e + 1) * 7)] for e in range(2))
    assert sorted(first) == sorted(second) == list(range(7)) and first != second


def test_slots_are_dealt_round_robin_and_data_parallel_equals_a_bigger_micro_batch():
    small = DataOrder({"a": 50, "b": 9}, {"a": 2, "b": 1}, "fixed", seed=1)
    big = DataOrder({"a": 50, "b": 9}, {"a": 4, "b": 2}, "fixed", seed=1)
    ranks = [stream(small, StreamState(), rank, 2, 6) for rank in range(2)]
    assert [s.index for s in ranks[0]] == [0, 2, 4, 6, 8, 10] and [s.index for s in ranks[1]][0] == 1
    single = stream(big, StreamState(), 0, 1, 6)
    for step in range(6):  # step m: ranks 0 and 1 together hold exactly what one process with 2b holds
        for task in ("a", "b"):
            assert ranks[0][step].samples[task] + ranks[1][step].samples[task] == single[step].samples[task]


def test_resuming_at_a_slot_continues_the_stream_on_any_world_size():
    schedule = DataOrder({"a": 13, "b": 5}, {"a": 3, "b": 2}, "sampled", seed=4)
    straight = stream(schedule, StreamState(), 0, 1, 12)
    state = schedule.advance(StreamState(), 4)
    assert state.positions == {t: sum(schedule.counts(k)[t] for k in range(4)) for t in ("a", "b")}
    resumed = [stream(schedule, state, rank, 2, 4) for rank in range(2)]
    interleaved = [slot for pair in zip(*resumed) for slot in pair]
    assert [(s.index, s.samples) for s in interleaved] == [(s.index, s.samples) for s in straight[4:12]]


def test_sampled_mixing_draws_in_proportion_and_is_deterministic():
    schedule = DataOrder({"a": 100, "b": 100}, {"a": 3, "b": 1}, "sampled", seed=0)
    counts = [schedule.counts(k) for k in range(400)]
    assert all(c["a"] + c["b"] == 4 for c in counts)
    assert sum(c["a"] for c in counts) / 1600 == pytest.approx(0.75, abs=0.03)
    assert any(c["b"] == 0 for c in counts)  # some micro-batches miss a task entirely
    assert counts == [DataOrder({"a": 100, "b": 100}, {"a": 3, "b": 1}, "sampled", seed=0).counts(k)
                      for k in range(400)]


def test_eval_batches_are_ordered_and_limited(image_set, text):
    folder, rows = image_set
    ds = image_dataset(folder, rows, text)
    batches = list(eval_batches(ds, batch_size=4, limit=5, pad_id=text.pad_id))
    assert [b.sample_ids for b in batches] == [["img0", "img1", "img2", "img3"], ["img4"]]
