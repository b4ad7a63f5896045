import math
import re

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from polytrain.errors import DataError
from polytrain.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig

RATE = 16_000


def tone(seconds: float, rate: int = RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    return np.stack([wave] * channels).astype(np.float32)


@pytest.mark.parametrize("seconds, n_mels, patch_mels, patch_frames, rows, cols", [
    # frames = 1 + (samples - 400) // 160; cols = ceil(frames / patch_frames)
    (1.0, 80, 16, 16, 5, math.ceil((1 + (16000 - 400) // 160) / 16)),  # 98 frames -> 7
    (0.5, 64, 16, 8, 4, math.ceil((1 + (8000 - 400) // 160) / 8)),  # 48 frames -> 6
    (0.01, 64, 16, 8, 4, 1),  # shorter than one window: padded to one frame
])
def test_patch_count_and_positions(seconds, n_mels, patch_mels, patch_frames, rows, cols):
    cfg = AudioTokenizerConfig(n_mels=n_mels, patch_mels=patch_mels, patch_frames=patch_frames)
    tokens = AudioTokenizer(cfg)(tone(seconds), RATE)
    assert tuple(tokens.values.shape) == (rows * cols, patch_mels * patch_frames)
    # time-major order: every mel row of time column 0, then column 1, ...
    assert tokens.positions[:rows].tolist() == [[r, 0] for r in range(rows)]
    assert tokens.positions[-1].tolist() == [rows - 1, cols - 1]


def test_features_equal_torchaudio_fbank_called_directly():
    cfg = AudioTokenizerConfig(n_mels=64, mean=-3.0, std=2.0)
    wave = torch.from_numpy(tone(0.7)[0])
    direct = torchaudio.compliance.kaldi.fbank(wave[None], sample_frequency=RATE, num_mel_bins=64,
                                               frame_length=25.0, frame_shift=10.0, window_type="hanning",
                                               dither=0.0, htk_compat=True, use_energy=False)
    ours = AudioTokenizer(cfg).features(wave)
    assert torch.allclose(ours, (direct + 3.0) / 2.0, atol=1e-5)


def test_patch_holds_a_mel_by_frame_block():
    cfg = AudioTokenizerConfig(n_mels=32, patch_mels=16, patch_frames=4)
    tok = AudioTokenizer(cfg)
    features = tok.features(torch.from_numpy(tone(0.3)[0]))
    tokens = tok(tone(0.3), RATE)
    row, col = tokens.positions[3].tolist()
    block = features[col * 4:(col + 1) * 4, row * 16:(row + 1) * 16]  # (frames, mels)
    assert torch.equal(tokens.values[3], block.T.flatten())


def test_stereo_file_at_another_rate_is_mixed_and_resampled(tmp_path):
    path = tmp_path / "stereo.wav"
    soundfile.write(path, tone(1.0, rate=8000, channels=2).T, 8000)
    tok = AudioTokenizer(AudioTokenizerConfig(n_mels=80, patch_mels=16, patch_frames=16))
    from_file = tok(path)
    from_16k = tok(tone(1.0), RATE)
    assert from_file.values.shape == from_16k.values.shape  # same duration, same grid


@pytest.mark.parametrize("samples, message", [
    (np.zeros(0, dtype=np.float32), "has no samples"),
    (np.array([0.1, np.nan, 0.2] * 500, dtype=np.float32), "NaN or infinite"),
    (np.array([0.1, np.inf] * 500, dtype=np.float32), "NaN or infinite"),
    (np.zeros((2, 2, 100), dtype=np.float32), "is not (samples,)"),
])
def test_bad_samples_raise(samples, message):
    with pytest.raises(DataError, match=re.escape(message)):
        AudioTokenizer(AudioTokenizerConfig())(samples, RATE)


def test_bad_files_name_the_path(tmp_path):
    tok = AudioTokenizer(AudioTokenizerConfig())
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.wav'}: audio file not found"):
        tok(tmp_path / "nope.wav")
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF but not really a wave file at all")
    with pytest.raises(DataError, match=f"{junk}: not a readable audio file"):
        tok(junk)
