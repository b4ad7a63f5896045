import math
import re

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

from polytrain.config.tokenizers import AudioTokenizerConfig
from polytrain.errors import DataError
from polytrain.tokenizers.audio import AudioTokenizer
from polytrain.tokenizers.audio_files import read_audio

RATE = 16_000


def tone(seconds: float, rate: int = RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(len(t))
    return np.stack([wave] * channels).astype(np.float32)


@pytest.mark.parametrize("seconds, n_mels, patch_mels, patch_frames, rows, cols", [
    # frames = 1 + (samples - 400) // 160; cols = ceil(frames / patch_frames)
    (1.0, 80, 16, 16, 5, math.ceil((1 + (16000 - 400) // 160) / 16)),  # 98 frames -> 7
    (0.5, 64, 16, 8, 4, math.ceil((1 + (8000 - 400) // 160) / 8)),  # 48 frames -> 6
    (0.1, 64, 16, 8, 4, 1),  # 8 frames: exactly one patch
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


def whisper_reference(wave: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Whisper's log-mel recipe spelled out on torchaudio's MelSpectrogram: (T, M)."""
    mel = torchaudio.transforms.MelSpectrogram(RATE, n_fft=400, hop_length=160, n_mels=n_mels, norm="slaney",
                                               mel_scale="slaney", power=2.0)(wave)[:, :-1]
    log_mel = mel.clamp(min=1e-10).log10()
    return ((torch.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0).T


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_features_equal_torchaudio_and_transformers(n_mels):
    from transformers import WhisperFeatureExtractor

    wave = tone(0.73)[0]
    cfg = AudioTokenizerConfig(frontend="whisper", n_mels=n_mels)
    ours = AudioTokenizer(cfg).features(torch.from_numpy(wave))
    assert ours.shape == (len(wave) // 160, n_mels) == (cfg.frames(len(wave)), n_mels)
    assert torch.allclose(ours, whisper_reference(torch.from_numpy(wave), n_mels), atol=1e-5)
    extractor = WhisperFeatureExtractor(feature_size=n_mels)  # Hugging Face's NumPy implementation, in float64
    theirs = extractor(wave, sampling_rate=RATE, padding="longest", return_tensors="np")["input_features"][0]
    assert np.allclose(ours.numpy(), theirs.T, atol=5e-5)


def test_named_constants_of_the_default_front_end():
    cfg = AudioTokenizerConfig()
    assert (cfg.window, cfg.hop, cfg.frames_per_second) == (400, 160, 100.0)  # 25 ms, 10 ms at 16 kHz
    assert cfg.frames(RATE) == 98 and AudioTokenizerConfig(frontend="whisper").frames(RATE) == 100
    assert cfg.grid == (5, math.ceil((1 + (160_000 - 400) // 160) / 16))  # 10 s: 998 frames -> 63 columns


@pytest.mark.parametrize("patch, stride", [((16, 8), (6, 4)), ((16, 16), (10, 10)), ((8, 4), (8, 4))])
def test_overlapping_patches_match_slicing_by_hand(patch, stride):
    (patch_mels, patch_frames), (stride_mels, stride_frames) = patch, stride
    n_mels = 40 if stride_mels != 10 else 128 - 2  # (n_mels - patch_mels) must be a multiple of stride_mels
    cfg = AudioTokenizerConfig(n_mels=n_mels, patch_mels=patch_mels, patch_frames=patch_frames,
                               stride_mels=stride_mels, stride_frames=stride_frames)
    cfg.check()
    tok = AudioTokenizer(cfg)
    features = tok.features(torch.from_numpy(tone(0.4)[0]))
    tokens = tok(tone(0.4), RATE)
    frames = features.shape[0]
    rows = (n_mels - patch_mels) // stride_mels + 1
    cols = math.ceil((frames - patch_frames) / stride_frames) + 1
    assert len(tokens) == rows * cols
    padded = torch.cat([features, torch.zeros((cols - 1) * stride_frames + patch_frames - frames, n_mels)])
    for i, (row, col) in enumerate(tokens.positions.tolist()):
        assert i == col * rows + row  # time-major order
        block = padded[col * stride_frames: col * stride_frames + patch_frames,
                       row * stride_mels: row * stride_mels + patch_mels]
        assert torch.equal(tokens.values[i], block.T.flatten())


def test_patch_strides_must_tile_the_mel_bins():
    from polytrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"stride_mels=10: must be in 1..patch_mels=16 and divide n_mels - "
                                          r"patch_mels = 112, so patches cover every mel bin"):
        AudioTokenizerConfig(n_mels=128, patch_mels=16, stride_mels=10).check()  # AST's 128/16/10 drops 2 bins
    with pytest.raises(ConfigError, match=r"patch_mels=10: must be positive and divide n_mels=64"):
        AudioTokenizerConfig(n_mels=64, patch_mels=10).check()


def test_spec_augment_draws_like_torchaudio_and_only_when_asked():
    cfg = AudioTokenizerConfig(n_mels=64, patch_mels=16, patch_frames=8, freq_mask=20, time_mask=30, masks=2)
    tok = AudioTokenizer(cfg)
    features = tok.features(torch.from_numpy(tone(1.0)[0]))
    ours = tok.spec_augment(features, torch.Generator().manual_seed(7))
    torch.manual_seed(7)  # torchaudio draws from the global generator, in the same order
    spec = features.T  # torchaudio's layout: (mel, time)
    for _ in range(2):
        spec = torchaudio.functional.mask_along_axis(spec, 20, 0.0, axis=0)
        spec = torchaudio.functional.mask_along_axis(spec, 30, 0.0, axis=1)
    assert torch.equal(ours, spec.T)
    assert not torch.equal(ours, features)
    assert torch.equal(tok(tone(1.0), RATE).values, tok(tone(1.0), RATE).values)  # no augment: deterministic
    plain = tok(tone(1.0), RATE).values
    augmented = tok(tone(1.0), RATE, augment=True, generator=torch.Generator().manual_seed(7)).values
    assert torch.equal(augmented, tok(tone(1.0), RATE, augment=True, generator=torch.Generator().manual_seed(7)).values)
    assert (augmented == 0).sum() > (plain == 0).sum()


@pytest.mark.parametrize("suffix, subtype, atol", [
    ("wav", "FLOAT", 0.0),  # float WAV holds the samples exactly
    ("wav", "PCM_16", 2e-2),
    ("flac", "PCM_24", 1e-3),
])
def test_lossless_files_give_the_tokens_of_their_samples(tmp_path, suffix, subtype, atol):
    path = tmp_path / f"x.{suffix}"
    soundfile.write(path, tone(0.6)[0], RATE, subtype=subtype)
    tok = AudioTokenizer(AudioTokenizerConfig())
    assert torch.allclose(tok(path).values, tok(tone(0.6), RATE).values, atol=atol)


@pytest.mark.parametrize("suffix, fmt, subtype", [("ogg", "OGG", "VORBIS"), ("mp3", "MP3", "MPEG_LAYER_III")])
def test_lossy_files_decode_to_the_same_duration_and_spectrum(tmp_path, suffix, fmt, subtype):
    path = tmp_path / f"x.{suffix}"
    soundfile.write(path, tone(1.0)[0], RATE, format=fmt, subtype=subtype)
    tok = AudioTokenizer(AudioTokenizerConfig())
    original = tok.features(torch.from_numpy(tone(1.0)[0]))
    decoded = tok.features(tok.waveform(torch.from_numpy(read_audio(path)[0]), RATE, str(path)))
    assert decoded.shape == original.shape
    assert decoded.mean(0).argmax() == original.mean(0).argmax()  # the 440 Hz tone's mel bin
    below_5khz = slice(0, 60)  # the codecs' low-pass shapes the top bins
    assert (decoded.mean(0)[below_5khz] - original.mean(0)[below_5khz]).abs().max() < 0.1


@pytest.mark.parametrize("rate, channels", [(8_000, 1), (16_000, 4), (22_050, 2), (44_100, 6), (48_000, 2)])
def test_resampling_and_mixing_equal_torchaudio_called_directly(tmp_path, rate, channels):
    wave = tone(0.8, rate=rate)[0]
    tracks = np.stack([(0.9 - 0.1 * c) * (wave if c % 2 == 0 else wave[::-1]) for c in range(channels)])
    path = tmp_path / "multi.wav"
    soundfile.write(path, tracks.T, rate, subtype="FLOAT")
    tok = AudioTokenizer(AudioTokenizerConfig())
    mono = torch.from_numpy(tracks.mean(0))
    direct = mono if rate == RATE else torchaudio.functional.resample(mono, rate, RATE)
    expected = (torchaudio.compliance.kaldi.fbank(direct[None], sample_frequency=RATE, num_mel_bins=80,
                                                  window_type="hanning", dither=0.0, htk_compat=True,
                                                  use_energy=False) + 4.27) / 4.57
    assert expected.shape == (1 + (int(0.8 * RATE) - 400) // 160, 80)  # 0.8 s at 16 kHz, whatever the file's rate
    assert torch.allclose(tok.features(tok.waveform(torch.from_numpy(tracks), rate, "x")), expected, atol=1e-5)
    assert torch.allclose(tok(path).values, tok(tracks, rate).values, atol=1e-6)


def test_integer_pcm_is_scaled_to_full_scale():
    wave = tone(0.5)[0]
    pcm = np.round(wave * 32767).astype(np.int16)
    tok = AudioTokenizer(AudioTokenizerConfig())
    assert torch.allclose(tok(pcm, RATE).values, tok(pcm.astype(np.float32) / 32768, RATE).values, atol=1e-6)
    with pytest.raises(DataError, match="audio ndarray: audio samples of type torch.int64 are ambiguous"):
        tok(pcm.astype(np.int64), RATE)


def test_long_clip_is_truncated_and_counted_or_refused(caplog):
    cfg = AudioTokenizerConfig(max_seconds=1.0)
    tok = AudioTokenizer(cfg)
    with caplog.at_level("WARNING", logger="polytrain.tokenizers.overflow"):
        long, cut = tok(tone(1.5), RATE), tok(tone(1.0), RATE)
    assert torch.equal(long.values, cut.values) and tok.overflow.count == 1
    assert "audio ndarray: 1.50 s cut to tokenizers.audio.max_seconds=1 s" in caplog.text
    strict = AudioTokenizer(AudioTokenizerConfig(max_seconds=1.0, overflow="error"))
    with pytest.raises(DataError, match="audio ndarray: 1.50 s exceeds tokenizers.audio.max_seconds=1 s"):
        strict(tone(1.5), RATE)


def test_truncated_files_are_refused(tmp_path):
    full = tmp_path / "full.wav"
    soundfile.write(full, tone(1.0)[0], RATE, subtype="PCM_16")  # 44-byte header + 32000 bytes
    cut = tmp_path / "cut.wav"
    cut.write_bytes(full.read_bytes()[:20_044])
    assert len(soundfile.read(cut)[0]) == 10_000  # libsndfile alone reads it without complaint
    tok = AudioTokenizer(AudioTokenizerConfig())
    with pytest.raises(DataError, match=f"{cut}: truncated WAV: its header declares 32000 bytes of audio, "
                                        f"the file holds 20000"):
        tok(cut)
    flac = tmp_path / "full.flac"
    soundfile.write(flac, tone(1.0)[0], RATE)
    cut_flac = tmp_path / "cut.flac"
    cut_flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    with pytest.raises(DataError, match=f"{cut_flac}: not a readable audio file"):
        tok(cut_flac)
