"""Audio: load, mix to mono, resample, log-mel filterbank (torchaudio), cut into spectrogram patches.

The filterbank is Kaldi-compatible (``torchaudio.compliance.kaldi.fbank``), as
in AST.  Patches tile the (mel, frame) plane: ``patch_mels`` bins by
``patch_frames`` frames; the sequence runs over time first-class (all mel
patches of frame block 0, then block 1, ...), so it stays in time order.

Shape legend: S samples, T frames, M mel bins, R = M / patch_mels patch rows.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor

from polytrain.errors import ConfigError, DataError
from polytrain.tokens import EmbedSpec, Tokens


@dataclass(frozen=True)
class AudioTokenizerConfig:
    sample_rate: int = 16_000
    """Rate every clip is resampled to, in Hz."""
    n_mels: int = 80
    """Mel filterbank bins per frame."""
    frame_length_ms: float = 25.0
    """Analysis window, in ms (400 samples at 16 kHz)."""
    frame_shift_ms: float = 10.0
    """Hop between frames, in ms (160 samples at 16 kHz: 100 frames per second)."""
    patch_mels: int = 16
    """Mel bins per patch; must divide ``n_mels``."""
    patch_frames: int = 16
    """Frames per patch (160 ms at a 10 ms hop)."""
    max_seconds: float = 10.0
    """Longer clips are cut to this length; it sizes the time position table."""
    mean: float = -4.27
    """Log-mel value subtracted before scaling (AST's AudioSet statistic)."""
    std: float = 4.57
    """Log-mel scale divided by after subtracting ``mean``."""

    def check(self) -> None:
        if self.patch_mels <= 0 or self.n_mels % self.patch_mels:
            raise ConfigError("patch_mels", self.patch_mels, f"must be positive and divide n_mels={self.n_mels}")
        if self.patch_frames <= 0:
            raise ConfigError("patch_frames", self.patch_frames, "must be positive")
        if self.frame_shift_ms <= 0 or self.frame_length_ms < self.frame_shift_ms:
            raise ConfigError("frame_shift_ms", self.frame_shift_ms,
                              f"must be > 0 and <= frame_length_ms={self.frame_length_ms}")
        if self.std <= 0:
            raise ConfigError("std", self.std, "must be > 0")
        if self.max_seconds * 1000 < self.frame_length_ms:
            raise ConfigError("max_seconds", self.max_seconds, "must hold at least one frame")

    @property
    def window(self) -> int:
        """Samples per analysis window."""
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def hop(self) -> int:
        """Samples between frame starts."""
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def max_frames(self) -> int:
        return 1 + (int(self.max_seconds * self.sample_rate) - self.window) // self.hop

    @property
    def grid(self) -> tuple[int, int]:
        """(mel patch rows, time patch columns) of the longest clip."""
        return self.n_mels // self.patch_mels, math.ceil(self.max_frames / self.patch_frames)


class AudioTokenizer:
    modality = "audio"

    def __init__(self, cfg: AudioTokenizerConfig):
        self.cfg = cfg

    def __call__(self, audio: str | Path | Tensor | np.ndarray, sample_rate: int | None = None) -> Tokens:
        """Spectrogram patches (N, patch_mels*patch_frames) with (mel row, time col) positions.

        ``audio`` is a file path, or samples shaped (S,) or (channels, S) at ``sample_rate``.
        """
        name = str(audio) if isinstance(audio, (str, Path)) else "audio tensor"
        if isinstance(audio, (str, Path)):
            audio, sample_rate = read_audio(audio)
        elif sample_rate is None:
            raise DataError("audio given as samples needs its sample_rate")
        waveform = self.waveform(torch.as_tensor(audio, dtype=torch.float32), sample_rate, name)
        return patchify(self.features(waveform), self.cfg.patch_mels, self.cfg.patch_frames)

    def waveform(self, samples: Tensor, sample_rate: int, name: str) -> Tensor:
        """Mono (S,) at the configured rate, cut to ``max_seconds`` and padded to one window."""
        if samples.dim() == 2:
            samples = samples.mean(dim=0)
        if samples.dim() != 1:
            raise DataError(f"{name}: audio of shape {tuple(samples.shape)} is not (samples,) or (channels, samples)")
        if samples.numel() == 0:
            raise DataError(f"{name}: audio has no samples")
        if not torch.isfinite(samples).all():
            raise DataError(f"{name}: audio contains NaN or infinite samples")
        if sample_rate != self.cfg.sample_rate:
            samples = torchaudio.functional.resample(samples, sample_rate, self.cfg.sample_rate)
        samples = samples[: int(self.cfg.max_seconds * self.cfg.sample_rate)]
        return F.pad(samples, (0, max(0, self.cfg.window - samples.numel())))

    def features(self, waveform: Tensor) -> Tensor:
        """Normalized log-mel filterbank (T, M) of a mono waveform (S,)."""
        fbank = torchaudio.compliance.kaldi.fbank(
            waveform[None], sample_frequency=self.cfg.sample_rate, num_mel_bins=self.cfg.n_mels,
            frame_length=self.cfg.frame_length_ms, frame_shift=self.cfg.frame_shift_ms,
            window_type="hanning", dither=0.0, htk_compat=True, use_energy=False)
        return (fbank - self.cfg.mean) / self.cfg.std

    def embed_spec(self) -> EmbedSpec:
        return EmbedSpec("audio", self.cfg.patch_mels * self.cfg.patch_frames, self.cfg.grid)


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """(channels, S) float32 samples and the file's sample rate."""
    if not Path(path).is_file():
        raise DataError(f"{path}: audio file not found")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as err:
        raise DataError(f"{path}: not a readable audio file ({err})") from None
    return samples.T, rate


def patchify(features: Tensor, patch_mels: int, patch_frames: int) -> Tokens:
    """Tile (T, M) into (T'/patch_frames * M/patch_mels, patch_mels*patch_frames) patches.

    T is zero-padded (zero is the normalized mean) up to a whole number of patches.
    """
    frames, mels = features.shape
    cols, rows = math.ceil(frames / patch_frames), mels // patch_mels
    padded = F.pad(features, (0, 0, 0, cols * patch_frames - frames))
    patches = (padded.reshape(cols, patch_frames, rows, patch_mels)
               .permute(0, 2, 3, 1)  # time col, mel row, mel, frame
               .reshape(cols * rows, patch_mels * patch_frames))
    col, row = torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="ij")
    positions = torch.stack([row.flatten(), col.flatten()], dim=1)
    return Tokens(patches.contiguous(), positions, "audio")
