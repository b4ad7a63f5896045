"""Audio: load, mix to mono, resample, log-mel filterbank (torchaudio), cut into spectrogram patches.

Two front ends (``audio_features.py``): the Kaldi-compatible fbank, as in AST,
and Whisper's log-mel.  Patches tile the (mel, frame) plane: ``patch_mels``
bins by ``patch_frames`` frames, every ``stride_mels`` bins and
``stride_frames`` frames (strides below the patch size overlap, as AST's do).
The sequence runs time first-class (all mel patches of time column 0, then
column 1, ...), so it stays in time order.

Shape legend: S samples, T frames, M mel bins, R mel patch rows, K time patch columns.
"""

import math
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor

from polytrain.errors import ConfigError, DataError
from polytrain.tokenizers.audio_features import (kaldi_fbank, kaldi_frames, mask_along, whisper_frames,
                                                 whisper_log_mel)
from polytrain.tokenizers.audio_files import read_audio, samples_to_float
from polytrain.tokenizers.overflow import Overflow, OverflowPolicy
from polytrain.tokens import EmbedSpec, Tokens

AudioInput = str | Path | Tensor | np.ndarray


@dataclass(frozen=True)
class AudioTokenizerConfig:
    sample_rate: int = 16_000
    """Rate every clip is resampled to, in Hz."""
    frontend: Literal["kaldi", "whisper"] = "kaldi"
    """kaldi: Kaldi-compatible log-mel fbank (AST), then (x - mean) / std. whisper: Whisper's log-mel (log10,
    8-decade range below the clip's peak, (x + 4) / 4); use n_mels 80 or 128 to match Whisper's."""
    n_mels: int = 80
    """Mel filterbank bins per frame."""
    frame_length_ms: float = 25.0
    """Analysis window, in ms (400 samples at 16 kHz; Whisper's n_fft)."""
    frame_shift_ms: float = 10.0
    """Hop between frames, in ms (160 samples at 16 kHz: 100 frames per second)."""
    patch_mels: int = 16
    """Mel bins per patch."""
    patch_frames: int = 16
    """Frames per patch (160 ms at a 10 ms hop)."""
    stride_mels: int = 0
    """Mel bins between the starts of vertically adjacent patches (0: patch_mels, no overlap); patches must tile
    the bins exactly: (n_mels - patch_mels) divisible by it."""
    stride_frames: int = 0
    """Frames between the starts of horizontally adjacent patches (0: patch_frames, no overlap)."""
    max_seconds: float = 10.0
    """Longest clip, in seconds; it sizes the time position table. Longer clips follow ``overflow``."""
    overflow: OverflowPolicy = "truncate"
    """A clip longer than ``max_seconds``: truncate keeps its start (counted, the first and every 1000th
    logged); error refuses it."""
    mean: float = -4.27
    """kaldi: log-mel value subtracted before scaling (AST's AudioSet statistic)."""
    std: float = 4.57
    """kaldi: log-mel scale divided by after subtracting ``mean``."""
    freq_mask: int = 0
    """SpecAugment, only when the caller asks (``augment=True``, training): widest frequency mask, in mel bins
    (0: none; AST uses 48 of 128)."""
    time_mask: int = 0
    """SpecAugment: widest time mask, in frames (0: none; AST uses 192 of 1024)."""
    masks: int = 1
    """SpecAugment: masks of each kind per clip."""

    def check(self) -> None:
        if self.stride_mels == 0 and (self.patch_mels <= 0 or self.n_mels % self.patch_mels):
            raise ConfigError("patch_mels", self.patch_mels, f"must be positive and divide n_mels={self.n_mels}")
        if not 0 < self.patch_mels <= self.n_mels:
            raise ConfigError("patch_mels", self.patch_mels, f"must be in 1..n_mels={self.n_mels}")
        if not 0 <= self.stride_mels <= self.patch_mels or (self.n_mels - self.patch_mels) % self.mel_stride:
            raise ConfigError("stride_mels", self.stride_mels,
                              f"must be in 1..patch_mels={self.patch_mels} and divide n_mels - patch_mels = "
                              f"{self.n_mels - self.patch_mels}, so patches cover every mel bin")
        if self.patch_frames <= 0:
            raise ConfigError("patch_frames", self.patch_frames, "must be positive")
        if not 0 <= self.stride_frames <= self.patch_frames:
            raise ConfigError("stride_frames", self.stride_frames, f"must be in 0..patch_frames={self.patch_frames}")
        if self.frame_shift_ms <= 0 or self.frame_length_ms < self.frame_shift_ms:
            raise ConfigError("frame_shift_ms", self.frame_shift_ms,
                              f"must be > 0 and <= frame_length_ms={self.frame_length_ms}")
        if self.std <= 0:
            raise ConfigError("std", self.std, "must be > 0")
        if self.max_seconds * self.sample_rate < self.min_samples:
            raise ConfigError("max_seconds", self.max_seconds, f"must hold one patch ({self.min_samples} samples)")
        for key in ("freq_mask", "time_mask", "masks"):
            if getattr(self, key) < 0:
                raise ConfigError(key, getattr(self, key), "must be >= 0")

    @property
    def window(self) -> int:
        """Samples per analysis window (Whisper's n_fft)."""
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def hop(self) -> int:
        """Samples between frame starts."""
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop

    @property
    def mel_stride(self) -> int:
        return self.stride_mels or self.patch_mels

    @property
    def frame_stride(self) -> int:
        return self.stride_frames or self.patch_frames

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.sample_rate)

    @property
    def min_samples(self) -> int:
        """The shortest clip that gives one whole patch of frames."""
        if self.frontend == "kaldi":
            return self.window + (self.patch_frames - 1) * self.hop
        return max(self.patch_frames * self.hop, self.window // 2 + 1)  # reflect padding needs S > n_fft // 2

    def frames(self, samples: int) -> int:
        """Frames a clip of ``samples`` gives."""
        if self.frontend == "kaldi":
            return kaldi_frames(samples, self.window, self.hop)
        return whisper_frames(samples, self.hop)

    @property
    def grid(self) -> tuple[int, int]:
        """(mel patch rows, time patch columns) of the longest clip."""
        return patch_grid(self.frames(self.max_samples), self.n_mels, self.patch_mels, self.patch_frames,
                          self.mel_stride, self.frame_stride)


class AudioTokenizer:
    modality = "audio"
    config_class = AudioTokenizerConfig

    def __init__(self, cfg: AudioTokenizerConfig):
        self.cfg = cfg
        self.overflow = Overflow(cfg.overflow, "tokenizers.audio.max_seconds")

    @property
    def augments(self) -> bool:
        """Whether ``augment=True`` changes anything: SpecAugment is configured."""
        return self.cfg.masks > 0 and (self.cfg.freq_mask > 0 or self.cfg.time_mask > 0)

    def __call__(self, audio: AudioInput, sample_rate: int | None = None, augment: bool = False,
                 generator: torch.Generator | None = None) -> Tokens:
        """Spectrogram patches (N, patch_mels*patch_frames) with (mel row, time col) positions.

        ``audio`` is a file path, or samples shaped (S,) or (channels, S) at ``sample_rate``. ``augment``
        applies SpecAugment (training only), drawing from ``generator`` (default: torch's global one).
        """
        name = str(audio) if isinstance(audio, (str, Path)) else f"audio {type(audio).__name__}"
        if isinstance(audio, (str, Path)):
            audio, sample_rate = read_audio(audio)
        elif not isinstance(sample_rate, Integral) or sample_rate <= 0:
            raise DataError(f"{name}: samples need their sample_rate in Hz (a positive integer), got {sample_rate!r}")
        try:
            samples = samples_to_float(audio)
        except DataError as err:
            raise DataError(f"{name}: {err}") from None
        features = self.features(self.waveform(samples, int(sample_rate), name))
        if augment:
            features = self.spec_augment(features, generator)
        cfg = self.cfg
        return patchify(features, cfg.patch_mels, cfg.patch_frames, cfg.mel_stride, cfg.frame_stride)

    def waveform(self, samples: Tensor, sample_rate: int, name: str) -> Tensor:
        """Mono (S,) at the configured rate, at most ``max_seconds`` long, at least one patch long."""
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
        if samples.numel() < self.cfg.min_samples:
            raise DataError(f"{name}: {samples.numel() / self.cfg.sample_rate:.3f} s of audio is shorter than one "
                            f"patch of patch_frames={self.cfg.patch_frames} frames "
                            f"({self.cfg.min_samples / self.cfg.sample_rate:.3f} s)")
        if samples.numel() > self.cfg.max_samples:
            self.overflow(name, f"{samples.numel() / self.cfg.sample_rate:.2f} s", f"{self.cfg.max_seconds:g} s")
            samples = samples[: self.cfg.max_samples]
        return samples

    def features(self, waveform: Tensor) -> Tensor:
        """Normalized log-mel features (T, M) of a mono waveform (S,)."""
        cfg = self.cfg
        if cfg.frontend == "whisper":
            return whisper_log_mel(waveform, cfg.sample_rate, cfg.n_mels, cfg.window, cfg.hop)
        fbank = kaldi_fbank(waveform, cfg.sample_rate, cfg.n_mels, cfg.frame_length_ms, cfg.frame_shift_ms)
        return fbank.sub_(cfg.mean).div_(cfg.std)

    def spec_augment(self, features: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``masks`` frequency masks, then ``masks`` time masks, on (T, M); masked values become 0 (the mean)."""
        for _ in range(self.cfg.masks):
            if self.cfg.freq_mask:
                features = mask_along(features, 1, self.cfg.freq_mask, generator)
            if self.cfg.time_mask:
                features = mask_along(features, 0, self.cfg.time_mask, generator)
        return features

    def embed_spec(self) -> EmbedSpec:
        return EmbedSpec("audio", self.cfg.patch_mels * self.cfg.patch_frames, self.cfg.grid)


def patch_grid(frames: int, mels: int, patch_mels: int, patch_frames: int, stride_mels: int,
               stride_frames: int) -> tuple[int, int]:
    """(R, K): mel rows that tile ``mels`` exactly; time columns covering ``frames``, the last one padded."""
    return (mels - patch_mels) // stride_mels + 1, max(1, math.ceil((frames - patch_frames) / stride_frames) + 1)


def patchify(features: Tensor, patch_mels: int, patch_frames: int, stride_mels: int | None = None,
             stride_frames: int | None = None) -> Tokens:
    """Tile (T, M) into (K*R, patch_mels*patch_frames) patches, features in (mel, frame) order.

    T is zero-padded (zero is the normalized mean) up to where the last column ends.
    """
    stride_mels, stride_frames = stride_mels or patch_mels, stride_frames or patch_frames
    frames, mels = features.shape
    rows, cols = patch_grid(frames, mels, patch_mels, patch_frames, stride_mels, stride_frames)
    padded = F.pad(features, (0, 0, 0, (cols - 1) * stride_frames + patch_frames - frames))
    patches = (padded.unfold(0, patch_frames, stride_frames)  # K, M, patch_frames
               .unfold(1, patch_mels, stride_mels)  # K, R, patch_frames, patch_mels
               .transpose(2, 3)
               .reshape(cols * rows, patch_mels * patch_frames))
    col, row = torch.meshgrid(torch.arange(cols), torch.arange(rows), indexing="ij")
    positions = torch.stack([row.flatten(), col.flatten()], dim=1)
    return Tokens(patches.contiguous(), positions, "audio")
