"""Datasets over prepared splits against the same datasets over the manifests they were prepared from."""

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from polytrain.config.data import TaskConfig
from polytrain.config.tokenizers import AudioTokenizerConfig, ImageTokenizerConfig, TextTokenizerConfig
from polytrain.errors import DataError
from polytrain.platform.data.datasets import build_dataset
from polytrain.platform.data.manifest import iter_manifest
from polytrain.platform.data.prepare import prepare_split, shard_builder
from polytrain.tokenizers.audio import AudioTokenizer
from polytrain.tokenizers.image import ImageTokenizer
from polytrain.tokenizers.text import TextTokenizer

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TASKS = {
    "caption": TaskConfig("encoder_decoder", "m.jsonl", "m.jsonl", source="image", max_target_len=3),
    "transcribe": TaskConfig("encoder_decoder", "m.jsonl", "m.jsonl", source="audio"),
    "ask": TaskConfig("decoder_only", "m.jsonl", "m.jsonl", source=["image", "audio"], seq_len=96),
    "lm": TaskConfig("decoder_only", "m.jsonl", "m.jsonl", seq_len=16, packing=True),
}


@pytest.fixture(scope="module")
def tokenizers():
    text = TextTokenizer.train([" ".join(WORDS), "which digit is it", "def f(x): return x"] * 20,
                               TextTokenizerConfig(vocab_size=300, max_len=64))
    image = ImageTokenizer(ImageTokenizerConfig(size=32, patch_size=8, channels=1, resize="fit"))
    audio = AudioTokenizer(AudioTokenizerConfig(n_mels=32, patch_mels=16, patch_frames=8, max_seconds=1.0))
    return {"text": text, "image": image, "audio": audio}


@pytest.fixture(scope="module")
def both(tmp_path_factory, tokenizers):
    """Each task's dataset over the manifest and over its prepared split."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (8 * (1 + i % 4), 8 * (1 + i % 3)), dtype=np.uint8)).save(
            folder / f"{i}.png")
        soundfile.write(folder / f"{i}.wav", rng.normal(0, 0.1, 2000 + 700 * i).astype(np.float32), 8000)
        word = " ".join(WORDS[k] for k in rng.integers(0, 10, 1 + i % 4))
        lines += [{"image": f"{i}.png", "target": word, "task": "caption"},
                  {"audio": f"{i}.wav", "target": word, "task": "transcribe"},
                  {"segments": [{"image": f"{i}.png"}, {"text": "which digit is it"}, {"audio": f"{i}.wav"},
                                {"text": word, "scored": True}], "task": "ask"},
                  {"text": f"def f(x): return x {word}", "task": "lm"}]
    manifest = folder / "m.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = {}
    with shard_builder(tokenizers["text"], 1) as build:
        for name, task in TASKS.items():
            records = iter_manifest(manifest, name, False, plain_text_scored=task.head == "decoder_only")
            prepare_split(records, folder / name, tokenizers["text"], {"task": name}, build, shard_records=5)
            out[name] = tuple(build_dataset(task, path, name, tokenizers, False, None) for path in (manifest,
                                                                                                 folder / name))
    return out


@pytest.mark.parametrize("name", TASKS)
def test_a_prepared_split_gives_the_examples_and_batches_its_manifest_gives(both, name):
    from_manifest, prepared = both[name]
    assert len(prepared) == len(from_manifest)
    for i in range(len(prepared)):
        a, b = from_manifest[i], prepared[i]
        assert (a.labels, a.target) == (b.labels, b.target)
        assert a.sample_id == b.sample_id or name == "lm"  # LM windows are named after their source
    a, b = (ds.collate([ds[i] for i in range(6)], torch.Generator().manual_seed(0)) for ds in both[name])
    for segment in ("inputs", "source"):
        x, y = getattr(a, segment), getattr(b, segment)
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.equal(x.values, y.values) and torch.equal(x.mask, y.mask)
            assert x.spans.keys() == y.spans.keys()
            for modality in x.spans:
                assert torch.equal(x.spans[modality].tokens.values, y.spans[modality].tokens.values)
    assert torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("name", TASKS)
def test_lengths_counted_from_sizes_match_the_laid_out_examples(both, name):
    """What budgets count without decoding, against each example as it is laid out."""
    _, prepared = both[name]
    for i in range(len(prepared)):
        example = prepared[i]
        pieces = example.inputs if isinstance(example.inputs, list) else [example.inputs]
        laid = (sum(len(p) for p in pieces),) + (() if example.decoder is None else (len(example.decoder),))
        assert prepared.lengths(i) == laid, i


def test_budgets_need_a_prepared_split(both):
    from_manifest, _ = both["caption"]
    with pytest.raises(DataError, match="data.tasks.caption: cost budgets read sample sizes from a prepared split"):
        from_manifest.lengths(0)


def test_a_corrupt_member_is_skipped_and_counted_with_skip_bad_samples(tmp_path, tokenizers):
    rows = []
    for i in range(4):
        Image.fromarray(np.full((16, 16), 60 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "target": WORDS[i]}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    with shard_builder(tokenizers["text"], 1) as build:
        prepare_split(iter_manifest(tmp_path / "m.jsonl", "caption", False), tmp_path / "s", tokenizers["text"], {},
                      build)
    shard = tmp_path / "s" / "shard-000000.arrow"
    data = bytearray(shard.read_bytes())
    data[data.index((tmp_path / "1.png").read_bytes()[-20:])] ^= 0xFF
    shard.write_bytes(bytes(data))
    strict = build_dataset(TASKS["caption"], tmp_path / "s", "caption", tokenizers, False)
    with pytest.raises(DataError, match=r"shard-000000\.arrow: member 1 \(.*m\.jsonl:2\): image part 0 fails its"):
        strict[1]
    lenient = build_dataset(TASKS["caption"], tmp_path / "s", "caption", tokenizers, True)
    example = lenient[1]
    assert example.target == WORDS[2] and len(example.skipped) == 1 and "member 1" in example.skipped[0]
