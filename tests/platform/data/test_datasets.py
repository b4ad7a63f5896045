"""Datasets: records laid out for each head, collated (packed or not), loaded in workers, evaluated in order."""

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from polytrain.config.data import TaskConfig
from polytrain.config.tokenizers import AudioTokenizerConfig, ImageTokenizerConfig, TextTokenizerConfig
from polytrain.errors import DataError
from polytrain.platform.data.datasets import LMStream, SequenceDataset
from polytrain.platform.data.loader import Mixture, eval_batches, micro_batches
from polytrain.platform.data.manifest import read_manifest
from polytrain.platform.data.order import DataOrder, StreamState
from polytrain.tokenizers.audio import AudioTokenizer
from polytrain.tokenizers.image import ImageTokenizer
from polytrain.tokenizers.text import TextTokenizer
from polytrain.tokens import IGNORE_INDEX

IMAGE = ImageTokenizer(ImageTokenizerConfig(size=8, patch_size=4, channels=1))


@pytest.fixture(scope="module")
def text() -> TextTokenizer:
    words = ["zero one two three four five six seven eight nine", "def f(x): return x", "which digit is it"] * 20
    return TextTokenizer.train(words, TextTokenizerConfig(vocab_size=300, max_len=32))


def write_manifest(path, lines: list) -> None:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def task(head: str, **fields) -> TaskConfig:
    return TaskConfig(head=head, train="m.jsonl", val="m.jsonl", **fields)


@pytest.fixture
def image_set(tmp_path):
    """Six small PNGs and a caption manifest of them."""
    rows = []
    for i in range(6):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "target": ["zero", "one"][i % 2], "id": f"img{i}"})
    return tmp_path, rows


def dataset(folder, rows, text, cfg: TaskConfig, skip=False, name="caption") -> SequenceDataset:
    write_manifest(folder / "m.jsonl", rows)
    records = read_manifest(folder / "m.jsonl", name, skip, plain_text_scored=cfg.head == "decoder_only")
    return SequenceDataset(records, name, cfg, {"text": text, "image": IMAGE}, skip)


def caption_set(folder, rows, text, skip=False) -> SequenceDataset:
    return dataset(folder, rows, text, task("encoder_decoder", source="image", max_target_len=4), skip)


def test_one_image_to_text_is_read_alone_and_the_target_is_bos_text_eos(image_set, text):
    folder, rows = image_set
    ds = caption_set(folder, rows, text)
    example = ds[3]
    assert example.sample_id == "img3" and example.target == "one"
    assert example.inputs.modality == "image" and example.inputs.tokens.values.shape == (4, 16)
    batch = ds.collate([ds[3], ds[4]])
    assert batch.source.modality == "image" and batch.source.values.shape == (2, 4, 16)
    one = text.encode("one")
    assert batch.inputs.values[0, : len(one) + 1].tolist() == [text.bos_id, *one]
    assert batch.labels[0, : len(one) + 1].tolist() == [*one, text.eos_id]


def test_decoder_only_lays_image_question_answer_out_as_one_sequence(image_set, text):
    folder, _ = image_set
    rows = [{"segments": [{"image": "3.png"}, {"text": "which digit"}, {"text": "three", "scored": True}]}]
    ds = dataset(folder, rows, text, task("decoder_only", source="image"), name="qa")
    batch = ds.collate([ds[0]])
    question, answer = text.encode("which digit"), text.encode("three")
    opening, closing = text.markers("image")
    full = [text.bos_id, opening, *[text.pad_id] * 4, closing, *question, *answer, text.eos_id]
    assert batch.inputs.values[0].tolist() == full[:-1]
    assert batch.inputs.positions[0, :, 1].tolist() == list(range(len(full) - 1))
    scored_from = len(full) - len(answer) - 1
    assert batch.labels[0].tolist() == [IGNORE_INDEX] * (scored_from - 1) + full[scored_from:]
    span = batch.inputs.spans["image"]
    assert span.rows.tolist() == [0] and span.starts.tolist() == [2]
    assert torch.equal(span.tokens.values[0], IMAGE(folder / "3.png").values)
    assert batch.prompt.values[0].tolist() == full[:scored_from] and batch.targets == ["three"]
    assert batch.bidirectional_spans


def test_without_span_markers_an_image_is_its_slots_each_holding_the_image_token(image_set, text):
    """LLaVA's layout: one <image> id per image feature, no markers; lengths count no markers; a cut keeps whole
    spans; a prompt that would end in an image is refused, naming its line."""
    folder, _ = image_set
    plain = TextTokenizer(text.hf, replace(text.cfg, span_markers=False))
    rows = [{"segments": [{"image": "3.png"}, {"text": "which digit"}, {"text": "three", "scored": True}]},
            {"segments": [{"image": "3.png"}, {"text": "three", "scored": True}]}]
    write_manifest(folder / "m.jsonl", rows)
    records = read_manifest(folder / "m.jsonl", "qa", False, plain_text_scored=True)
    ds = SequenceDataset(records, "qa", task("decoder_only", source="image"), {"text": plain, "image": IMAGE}, False)
    batch = ds.collate([ds[0]])
    slot = text.hf.token_to_id("<image>")
    full = [text.bos_id, *[slot] * 4, *text.encode("which digit"), *text.encode("three"), text.eos_id]
    assert batch.inputs.values[0].tolist() == full[:-1] and batch.inputs.spans["image"].starts.tolist() == [1]
    assert ds.example(records[0]).inputs.cut(4).spans == [] and len(ds.example(records[0]).inputs.cut(5).spans) == 1
    with pytest.raises(DataError, match=r"m.jsonl:2: the scored text follows a image span directly"):
        ds[1]


def test_a_sample_without_a_scored_segment_or_with_an_unknown_modality_names_its_line(image_set, text):
    folder, _ = image_set
    rows = [{"segments": [{"image": "3.png"}, {"text": "which digit"}]}, {"segments": [{"image": "3.png"},
                                                                                        {"text": "x", "scored": True}]}]
    ds = dataset(folder, rows, text, task("decoder_only", source="image"), name="qa")
    with pytest.raises(DataError, match=r"m.jsonl:1: no scored segment"):
        ds[0]
    text_only = dataset(folder, rows, text, task("decoder_only"), name="qa")
    with pytest.raises(DataError, match=r"m.jsonl:2: a image segment, but data.tasks.qa.source does not name image"):
        text_only[1]


def test_a_sample_longer_than_seq_len_is_cut_whole_spans_only_or_refused(image_set, text):
    folder, _ = image_set
    rows = [{"segments": [{"text": "which digit is it"}, {"image": "3.png"}, {"text": "three", "scored": True}]}]
    long = dataset(folder, rows, text, task("decoder_only", source="image", seq_len=6), name="qa")
    with pytest.raises(DataError, match="nothing scored is left within seq_len=6"):  # the cut drops the span
        long[0]
    strict = TextTokenizer(text.hf, TextTokenizerConfig(vocab_size=300, max_len=32, overflow="error"))
    refused = SequenceDataset(long.records, "qa", long.task, {"text": strict, "image": IMAGE}, False)
    with pytest.raises(DataError, match=r"m.jsonl:1: \d+ tokens exceeds data.tasks.qa.seq_len=7"):
        refused[0]


def test_two_images_and_a_question_reach_the_encoder_in_order(image_set, text):
    folder, _ = image_set
    rows = [{"segments": [{"image": "1.png"}, {"image": "2.png"}, {"text": "which digit"},
                          {"text": "one two", "scored": True}]}]
    ds = dataset(folder, rows, text, task("encoder_decoder", source="image"))
    batch = ds.collate([ds[0]])
    opening, closing = text.markers("image")
    assert batch.source.modality == "text" and batch.source.values[0, :7].tolist() == [opening] + [text.pad_id] * 4 \
        + [closing, opening]
    assert batch.source.spans["image"].starts.tolist() == [1, 7]
    assert batch.targets == ["one two"]


def test_classification_labels_are_class_ids_and_an_unknown_class_names_the_line(image_set, text):
    folder, _ = image_set
    rows = [{"image": "1.png", "label": "one"}, {"image": "2.png", "label": "zero"}, {"image": "3.png", "label": "six"}]
    ds = dataset(folder, rows, text, task("encoder_classifier", source="image", classes=["zero", "one"]),
                 name="digits")
    batch = ds.collate([ds[0], ds[1]])
    assert batch.labels.tolist() == [1, 0] and batch.targets == ["one", "zero"] and batch.inputs.modality == "image"
    with pytest.raises(DataError, match=r"m.jsonl:3: label 'six' is not one of data.tasks.digits.classes"):
        ds[2]


def test_masked_lm_masks_regular_tokens_the_same_way_for_the_same_slot(tmp_path, text):
    rows = [{"text": "zero one two three four five six seven eight nine " * 2}] * 8
    ds = dataset(tmp_path, rows, text, task("masked_lm", mask_probability=0.3), name="mlm")
    examples = [ds[i] for i in range(8)]
    first = ds.collate(examples, torch.Generator().manual_seed(5))
    again = ds.collate(examples, torch.Generator().manual_seed(5))
    other = ds.collate(examples, torch.Generator().manual_seed(6))
    assert torch.equal(first.inputs.values, again.inputs.values) and torch.equal(first.labels, again.labels)
    assert not torch.equal(first.labels, other.labels)
    selected = first.labels != IGNORE_INDEX
    assert selected.float().mean() == pytest.approx(0.3, abs=0.08)
    assert not torch.isin(first.labels[selected], text.special_ids).any()
    assert (first.inputs.values[selected] == text.mask_id).float().mean() == pytest.approx(0.8, abs=0.1)


def test_packing_fills_rows_with_whole_samples_each_its_own_document(image_set, text):
    folder, _ = image_set
    rows = [{"segments": [{"image": f"{i}.png"}, {"text": "digit"}, {"text": w, "scored": True}]}
            for i, w in enumerate(["zero", "one", "two", "three"])]
    packed = dataset(folder, rows, text, task("decoder_only", source="image", packing=True, seq_len=28), name="qa")
    plain = dataset(folder, rows, text, task("decoder_only", source="image"), name="qa")
    examples = [packed[i] for i in range(4)]
    lengths = [len(e.inputs) for e in examples]
    batch, unpacked = packed.collate(examples), plain.collate(examples)
    assert batch.inputs.values.shape[0] == 2 and sum(lengths) > 28 and max(lengths) * 2 <= 28
    assert batch.inputs.documents is not None
    def prompts(b):  # generation starts from each sample alone, in the order of the batch's samples
        return {t: b.prompt.values[i][b.prompt.mask[i]].tolist() for i, t in enumerate(b.targets)}
    assert prompts(batch) == prompts(unpacked) and len(prompts(batch)) == 4
    for r in range(2):  # every document restarts its positions; labels stay with their tokens
        docs = batch.inputs.documents[r]
        for d in range(int(docs.max()) + 1):
            cols = (docs == d).nonzero().flatten()
            assert batch.inputs.positions[r, cols, 1].tolist() == list(range(len(cols)))
    real = batch.labels != IGNORE_INDEX
    assert sorted(batch.labels[real].tolist()) == sorted(unpacked.labels[unpacked.labels != IGNORE_INDEX].tolist())
    assert batch.inputs.spans["image"].rows.tolist().count(0) + batch.inputs.spans["image"].rows.tolist().count(1) == 4


def test_missing_or_corrupt_file_names_manifest_line_and_file(image_set, text):
    folder, rows = image_set
    (folder / "2.png").write_bytes(b"garbage")
    rows[4]["image"] = "gone.png"
    ds = caption_set(folder, rows, text)
    with pytest.raises(DataError, match=rf"m.jsonl:3: {folder / '2.png'}: not a readable image"):
        ds[2]
    with pytest.raises(DataError, match=rf"m.jsonl:5: {folder / 'gone.png'}: image file not found"):
        ds[4]


def test_skip_replaces_a_bad_sample_with_the_next_good_one(image_set, text):
    folder, rows = image_set
    (folder / "2.png").write_bytes(b"garbage")
    example = caption_set(folder, rows, text, skip=True)[2]
    assert example.sample_id == "img3"
    assert len(example.skipped) == 1 and "2.png" in example.skipped[0]


def test_error_in_loader_worker_surfaces_as_a_clean_data_error(image_set, text):
    folder, rows = image_set
    (folder / "1.png").write_bytes(b"garbage")
    ds = caption_set(folder, rows, text)
    with pytest.raises(DataError, match=r"m.jsonl:2: .*1.png: not a readable image") as err:
        next(micro_batches(Mixture({"caption": ds}, seed=0), one_task_slots(len(ds), 6), num_workers=1))
    assert "Traceback" not in str(err.value)


def test_skipped_samples_are_logged_once_each(image_set, text, caplog):
    folder, rows = image_set
    (folder / "1.png").write_bytes(b"garbage")
    ds = caption_set(folder, rows, text, skip=True)
    batches = micro_batches(Mixture({"caption": ds}, seed=0), one_task_slots(len(ds), 6), num_workers=0)
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
    ds = SequenceDataset(read_manifest(tmp_path / "m.jsonl", "speech", False, False), "speech",
                         task("encoder_decoder", source="audio", max_target_len=4), {"text": text, "audio": tok}, False)
    batch = ds.collate([ds[0], ds[1]])
    short, long = (len(ds[i].inputs) for i in range(2))
    assert batch.source.values.shape == (2, long, 128)
    assert batch.source.mask.sum(1).tolist() == [short, long]
    assert (batch.labels[:, 0] != IGNORE_INDEX).all()


def test_lm_windows_are_contiguous_shifted_and_cover_the_stream(tmp_path, text):
    write_manifest(tmp_path / "m.jsonl", [{"text": "def f(x): return x " * 20}, {"text": "zero one two"}])
    ds = LMStream.of_records(read_manifest(tmp_path / "m.jsonl", "lm", False), text, task("decoder_only", seq_len=8),
                             None)
    assert len(ds) == (len(ds.windows.tokens) - 1) // 8
    batch = ds.collate([ds[0], ds[1]])
    assert torch.equal(batch.inputs.values[0, 1:], batch.labels[0, :-1])
    assert batch.labels[0, -1] == batch.inputs.values[1, 0]  # window 1 starts where window 0's labels end
    assert int((ds.windows.tokens == text.eos_id).sum()) == 2  # one eos after each document


def test_packed_lm_windows_keep_their_document_boundaries(tmp_path, text):
    write_manifest(tmp_path / "m.jsonl", [{"text": "zero one two"}, {"text": "three four"}, {"text": "def f(x)"}] * 3)
    records = read_manifest(tmp_path / "m.jsonl", "lm", False)
    packed = LMStream.of_records(records, text, task("decoder_only", seq_len=12, packing=True), None)
    plain = LMStream.of_records(records, text, task("decoder_only", seq_len=12), None)
    a, b = packed.collate([packed[1]]), plain.collate([plain[1]])
    assert torch.equal(a.inputs.values, b.inputs.values) and torch.equal(a.labels, b.labels)  # same tokens
    eos = (a.inputs.values[0] == text.eos_id).nonzero().flatten().tolist()
    docs = a.inputs.documents[0].tolist()
    assert all(docs[i + 1] == docs[i] + 1 for i in eos if i + 1 < len(docs))  # a new document after each eos
    assert all(a.inputs.positions[0, i + 1, 1] == 0 for i in eos if i + 1 < len(docs))


def one_task_slots(size: int, batch: int):
    return DataOrder({"caption": size}, {"caption": batch}, "fixed", seed=0).slots(StreamState(), 0, 1)


def test_eval_batches_are_ordered_and_limited(image_set, text):
    folder, rows = image_set
    ds = caption_set(folder, rows, text)
    batches = list(eval_batches(ds, batch_size=4, limit=5))
    assert [b.sample_ids for b in batches] == [["img0", "img1", "img2", "img3"], ["img4"]]
