"""The loader: what a micro-batch draws at random depends on its slot only, not on the process that loads it."""

import json

import numpy as np
import soundfile
import torch

from polytrain.config.data import TaskConfig
from polytrain.config.tokenizers import AudioTokenizerConfig, TextTokenizerConfig
from polytrain.platform.data.datasets import SequenceDataset
from polytrain.platform.data.loader import Mixture, micro_batches
from polytrain.platform.data.manifest import read_manifest
from polytrain.platform.data.order import DataOrder, StreamState
from polytrain.tokenizers.audio import AudioTokenizer
from polytrain.tokenizers.text import TextTokenizer


def test_spec_augment_is_a_pure_function_of_the_slot(tmp_path):
    rng = np.random.default_rng(0)
    with (tmp_path / "m.jsonl").open("w") as lines:
        for i in range(6):
            soundfile.write(tmp_path / f"{i}.wav", rng.normal(0, 0.1, 8000).astype(np.float32), 16000)
            lines.write(json.dumps({"audio": f"{i}.wav", "target": "two"}) + "\n")
    text = TextTokenizer.train(["two"] * 10, TextTokenizerConfig(vocab_size=300))
    audio = AudioTokenizer(AudioTokenizerConfig(n_mels=32, patch_mels=16, patch_frames=8, freq_mask=8, time_mask=10))
    def dataset(augment: bool) -> SequenceDataset:
        return SequenceDataset(read_manifest(tmp_path / "m.jsonl", "speech", False, False), "speech",
                               TaskConfig("encoder_decoder", "m", "m", source="audio"), {"text": text, "audio": audio},
                               False, augment=augment)

    order = DataOrder({"speech": 6}, {"speech": 2}, "fixed", seed=0)

    def sources(workers: int, augment: bool = True) -> list[torch.Tensor]:
        mixture = Mixture({"speech": dataset(augment)}, seed=5)
        batches = micro_batches(mixture, order.slots(StreamState(), 0, 1), workers)
        return [next(batches).tasks["speech"].source.values for _ in range(4)]

    torch.manual_seed(1)
    before = torch.rand(3)
    here = sources(0)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), before)  # loading here left the training process's draws alone
    assert all(torch.equal(a, b) for a, b in zip(here, sources(2)))  # two worker processes augment as this one
    assert not any(torch.equal(a, b) for a, b in zip(here, sources(0, augment=False)))  # and it did augment
