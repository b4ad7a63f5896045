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
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor

from polytrain.config.tokenizers import AudioTokenizerConfig, patch_grid
from polytrain.errors import DataError
from polytrain.tokenizers.audio_features import kaldi_fbank, mask_along, whisper_log_mel
from polytrain.tokenizers.audio_files import read_audio, samples_to_float
from polytrain.tokenizers.overflow import Overflow
from polytrain.tokens import EmbedSpec, Tokens

AudioInput = str | Path | bytes | Tensor | np.ndarray


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

        ``audio`` is a file (its path or its bytes), or samples shaped (S,) or (channels, S) at ``sample_rate``. ``augment``
        applies SpecAugment (training only), drawing from ``generator`` (default: torch's global one).
        """
        name = str(audio) if isinstance(audio, (str, Path)) else f"audio {type(audio).__name__}"
        if isinstance(audio, (str, Path, bytes)):  # a file, by path or as its bytes (a prepared shard's)
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

    def count(self, samples: int, sample_rate: int) -> int:
        """Patches a clip of ``samples`` at ``sample_rate`` gives, without decoding it (cost budgets count them)."""
        cfg = self.cfg
        resampled = math.ceil(samples * cfg.sample_rate / sample_rate)  # torchaudio's resample keeps ceil(S * new / old)
        rows, cols = patch_grid(cfg.frames(min(resampled, cfg.max_samples)), cfg.n_mels, cfg.patch_mels,
                                cfg.patch_frames, cfg.mel_stride, cfg.frame_stride)
        return rows * cols

    def embed_spec(self) -> EmbedSpec:
        return EmbedSpec("audio", self.cfg.patch_mels * self.cfg.patch_frames, self.cfg.grid)


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
