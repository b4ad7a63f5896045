"""A run builds every tokenizer from its own config section."""

import json

import numpy as np
import pytest
import soundfile
import torch

from polytrain.config import load_config
from polytrain.config.tokenizers import TextTokenizerConfig
from polytrain.errors import DataError
from polytrain.platform.data.builtin import task_manifests
from polytrain.platform.data.datasets import build_datasets
from polytrain.tokenizers.build import patch_tokenizers, text_tokenizer
from polytrain.tokenizers.text import TextTokenizer

TASK = ["data.tasks.t.head=encoder_decoder", "data.tasks.t.source=image", "data.tasks.t.train=m.jsonl",
        "data.tasks.t.val=m.jsonl"]


def test_tokenizers_get_every_key_of_their_sections(tmp_path):
    cfg = load_config(None, TASK + ["data.tasks.t.max_target_len=4", "tokenizers.text.max_len=6",
                                    "tokenizers.text.overflow=error", "tokenizers.text.pad_to_multiple=8",
                                    "tokenizers.image.size=16", "tokenizers.image.patch_size=8",
                                    "tokenizers.image.channels=1"])
    trained = TextTokenizer.train(["seven eight nine"] * 10, TextTokenizerConfig(vocab_size=300))
    tokenizers = {"text": text_tokenizer(cfg, trained.hf.to_str()), **patch_tokenizers(cfg)}
    text, image = tokenizers["text"], tokenizers["image"]
    assert text.cfg == cfg.tokenizers.text and image.cfg == cfg.tokenizers.image
    with pytest.raises(DataError, match=r"\d+ tokens exceeds tokenizers.text.max_len=6 \(overflow=error"):
        text("seven eight nine seven eight nine")
    assert text.batch(["seven", "eight nine"]).values.shape[1] == 8  # padded to a multiple of 8
    assert image.embed_spec().input_dim == 1 * 8 * 8 and image.embed_spec().grid == (2, 2)


def test_audio_training_samples_get_spec_augment_and_validation_samples_do_not(tmp_path):
    wave = 0.3 * np.sin(np.arange(16_000) * 2 * np.pi * 440 / 16_000).astype(np.float32)
    soundfile.write(tmp_path / "a.wav", wave, 16_000)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "target": "seven"}) + "\n")
    cfg = load_config(None, ["data.tasks.t.head=encoder_decoder", "data.tasks.t.source=audio",
                             f"data.tasks.t.train={manifest}", f"data.tasks.t.val={manifest}",
                             "tokenizers.audio.freq_mask=30", "tokenizers.audio.time_mask=40"])
    trained = TextTokenizer.train(["seven eight nine"] * 10, TextTokenizerConfig(vocab_size=300))
    tokenizers = {"text": text_tokenizer(cfg, trained.hf.to_str()), **patch_tokenizers(cfg)}
    audio = tokenizers["audio"]
    train, val = (build_datasets(cfg, split, tokenizers, task_manifests(cfg))["t"] for split in ("train", "val"))
    plain = audio(tmp_path / "a.wav").values
    torch.manual_seed(3)
    augmented = train[0].inputs.tokens.values
    torch.manual_seed(3)  # the tokenizer's SpecAugment, from the same RNG state (checked against torchaudio's)
    assert torch.equal(augmented, audio(tmp_path / "a.wav", augment=True).values)
    assert (augmented == 0).sum() > (plain == 0).sum()
    assert torch.equal(val[0].inputs.tokens.values, plain)  # validation: never augmented
    unmasked = patch_tokenizers(load_config(None, TASK[:1] + ["data.tasks.t.source=audio"] + TASK[2:]))
    assert not unmasked["audio"].augments  # no masks configured: training samples stay as they are
