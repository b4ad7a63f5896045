"""Every kind of bad input the tokenizers meet: a clear error that names it, or a counted skip in the platform."""

import json
import re

import numpy as np
import pytest
import soundfile
from PIL import Image

from polytrain.config.data import TaskConfig
from polytrain.config.tokenizers import (
    AudioTokenizerConfig,
    ImageTokenizerConfig,
    TextTokenizerConfig,
    TokenizersConfig,
)
from polytrain.errors import DataError, PolytrainError
from polytrain.platform.data.datasets import SequenceDataset
from polytrain.platform.data.manifest import read_manifest
from polytrain.tokenizers.audio import AudioTokenizer
from polytrain.tokenizers.build import build_patch_tokenizer
from polytrain.tokenizers.image import ImageTokenizer
from polytrain.tokenizers.text import TextTokenizer
from tests.tokenizers.test_image import png_header_only

RATE = 16_000
IMAGE = ImageTokenizerConfig(size=8, patch_size=4, channels=1)
AUDIO = AudioTokenizerConfig(n_mels=64, patch_mels=16, patch_frames=8, max_seconds=2.0)  # the quick start's


def write_bad_files(folder):
    """{name: (path, message)} for one file of each bad kind, plus good ones under good_*."""
    Image.fromarray(np.full((8, 8), 90, dtype=np.uint8)).save(folder / "good_image.png")
    soundfile.write(folder / "good_audio.wav", np.sin(np.arange(RATE // 2) / 9).astype(np.float32) * 0.3, RATE)
    (folder / "not_an_image.png").write_text("a text file with an image's name")
    Image.fromarray(np.zeros((1, 1), dtype=np.uint8)).save(folder / "one_pixel.png")
    png_header_only(folder / "huge.png", 20000, 20000)
    soundfile.write(folder / "empty.wav", np.zeros(0, dtype=np.float32), RATE)
    soundfile.write(folder / "click.wav", np.ones(800, dtype=np.float32) * 0.1, RATE)  # 50 ms < one 95 ms patch
    soundfile.write(folder / "nan.wav", np.array([0.1, np.nan] * 4000, dtype=np.float32), RATE, subtype="FLOAT")
    full = (folder / "good_audio.wav").read_bytes()
    (folder / "truncated.wav").write_bytes(full[: len(full) // 2])
    return {
        "not_an_image.png": "not a readable image",
        "one_pixel.png": "1x1 image has a side shorter than min_side=4 pixels",
        "huge.png": "20000x20000 image has 400000000 pixels, more than 64000000; refused before decoding",
        "empty.wav": "audio has no samples",
        "click.wav": "0.050 s of audio is shorter than one patch of patch_frames=8 frames (0.095 s)",
        "nan.wav": "audio contains NaN or infinite samples",
        "truncated.wav": "truncated WAV: its header declares 16000 bytes of audio, the file holds 7978",
    }


def tokenizer_for(name):
    return ImageTokenizer(IMAGE) if name.endswith(".png") else AudioTokenizer(AUDIO)


def seq2seq(records, source, text, skip_bad: bool) -> SequenceDataset:
    """(source, target) pairs: the source read by ``source``'s tokenizer, targets of at most 4 tokens."""
    cfg = TaskConfig(head="encoder_decoder", train="m", val="m", max_target_len=4, seq_len=8,
                     source=None if source is text else source.modality)
    tokenizers = {"text": text} if source is text else {"text": text, source.modality: source}
    return SequenceDataset(records, "t", cfg, tokenizers, skip_bad)


@pytest.mark.parametrize("name", ["not_an_image.png", "one_pixel.png", "huge.png", "empty.wav", "click.wav",
                                  "nan.wav", "truncated.wav"])
def test_bad_file_gives_an_error_naming_it(tmp_path, name):
    message = write_bad_files(tmp_path)[name]
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / name}: {message}")):
        tokenizer_for(name)(tmp_path / name)


def test_bad_text_gives_an_error_saying_what_is_wrong():
    strict = TextTokenizer.train(["seven eight nine"] * 10, TextTokenizerConfig(vocab_size=300, max_len=4,
                                                                                overflow="error"))
    with pytest.raises(DataError, match="empty text"):
        strict("")
    with pytest.raises(DataError, match=r"text 'seven eight nine seven eight nine': \d+ tokens exceeds "
                                        r"tokenizers.text.max_len=4"):
        strict("seven eight nine seven eight nine")
    with pytest.raises(DataError, match="text #0 is not valid Unicode"):
        strict.encode("\udcff")


def test_unknown_modality_lists_the_known_ones():
    with pytest.raises(PolytrainError, match=r"unknown modality 'vidoe'; known: audio, image, text"):
        build_patch_tokenizer("vidoe", TokenizersConfig())


@pytest.mark.parametrize("modality, bad", [
    ("image", ["not_an_image.png", "one_pixel.png", "huge.png"]),
    ("audio", ["empty.wav", "click.wav", "nan.wav", "truncated.wav"]),
])
def test_with_skip_bad_samples_every_bad_file_is_skipped_and_named(tmp_path, modality, bad):
    messages = write_bad_files(tmp_path)
    good = f"good_{modality}.{'png' if modality == 'image' else 'wav'}"
    rows = [{modality: name, "target": "seven"} for name in [good, *bad, good]]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = TextTokenizer.train(["seven"] * 10, TextTokenizerConfig(vocab_size=300))
    dataset = seq2seq(read_manifest(tmp_path / "m.jsonl", "t", False), tokenizer_for(good), text, skip_bad=True)
    sample = dataset[1]  # the first bad line: passed over until the good one after the bad ones
    assert sample.sample_id == f"{tmp_path / 'm.jsonl'}:{len(rows)}"
    assert len(sample.skipped) == len(bad)
    for line, (name, skipped) in enumerate(zip(bad, sample.skipped), start=2):
        assert skipped.startswith(f"{tmp_path / 'm.jsonl'}:{line}: {tmp_path / name}: {messages[name]}")


def test_lone_surrogate_in_a_manifest_names_the_line_or_is_a_counted_skip(tmp_path, caplog):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"text": "seven eight"}\n{"text": "bad \\ud800 text"}\n{"text": "nine"}\n')
    with pytest.raises(DataError, match=re.escape(f"{manifest}:2: field 'text' is not valid Unicode: surrogates not "
                                                  f"allowed at character 4 ('\\ud800')")):
        read_manifest(manifest, "t", False)
    with caplog.at_level("WARNING", logger="polytrain.platform.data.manifest"):
        records = read_manifest(manifest, "t", True)
    assert [r.parts[0].value for r in records] == ["seven eight", "nine"]
    assert f"{manifest}: skipped 1 bad line(s)" in caplog.text


def test_with_skip_bad_samples_bad_text_sources_are_skipped_and_named(tmp_path):
    rows = [{"text": "seven", "target": "eight"}, {"text": " ", "target": "x"},
            {"text": "nine " * 20, "target": "x"}, {"text": "eight", "target": "nine"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = TextTokenizer.train(["seven eight nine"] * 10, TextTokenizerConfig(vocab_size=300, max_len=8,
                                                                              overflow="error"))
    records = read_manifest(tmp_path / "m.jsonl", "t", False)
    sample = seq2seq(records, text, text, skip_bad=True)[2]
    assert sample.sample_id == f"{tmp_path / 'm.jsonl'}:4" and sample.target == "nine"
    assert re.fullmatch(re.escape(f"{tmp_path / 'm.jsonl'}:3: ") + r"\d+ tokens exceeds data.tasks.t.seq_len=8 "
                        r"\(overflow=error; overflow=truncate cuts it instead\)", sample.skipped[0])
    assert len(sample.skipped) == 1
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'm.jsonl'}:3: ")):
        seq2seq(records, text, text, skip_bad=False)[2]


@pytest.mark.parametrize("overflow", ["truncate", "error"])
def test_overlong_target_is_cut_and_counted_or_refused(tmp_path, caplog, overflow):
    rows = [{"text": "seven", "target": "eight"}, {"text": "nine", "target": "seven eight nine " * 4}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    text = TextTokenizer.train(["seven eight nine"] * 10, TextTokenizerConfig(vocab_size=300, overflow=overflow))
    dataset = seq2seq(read_manifest(tmp_path / "m.jsonl", "t", False), text, text, skip_bad=False)
    full = text.encode("seven eight nine " * 4)
    where = f"{tmp_path / 'm.jsonl'}:2: target: {len(full)} tokens"
    if overflow == "error":
        with pytest.raises(DataError, match=re.escape(f"{where} exceeds max_target_len=4 (overflow=error")):
            dataset[1]
        return
    with caplog.at_level("WARNING", logger="polytrain.tokenizers.overflow"):
        short, long = dataset[0], dataset[1]
        assert short.decoder.ids + short.labels[-1:] == [text.bos_id, *text.encode("eight"), text.eos_id]
        assert long.decoder.ids + long.labels[-1:] == [text.bos_id, *full[:4], text.eos_id]
    assert dataset.target_overflow.count == 1
    assert f"{where} cut to max_target_len=4 (1 sample(s) cut so far" in caplog.text
