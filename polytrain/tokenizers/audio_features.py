"""Log-mel front ends as pure functions: Kaldi-compatible fbank (as in AST) and Whisper's log-mel; SpecAugment.

Both take a mono waveform (S,) and return features (T, M), time first.
Frame counts (what a clip of S samples gives):

- kaldi: windows that fit whole (``snip_edges``): ``T = 1 + (S - window) // hop``, 0 when S < window.
- whisper: centered STFT with the last frame dropped: ``T = S // hop``.

Shape legend: S samples, T frames, M mel bins, F = n_fft // 2 + 1 frequency bins.
"""

from functools import lru_cache

import torch
import torchaudio
from torch import Tensor

WHISPER_LOG_FLOOR = 1e-10
"""Mel power is clamped to this before log10 (-10 decades)."""
WHISPER_DYNAMIC_RANGE = 8.0
"""Decades (80 dB) kept below the clip's loudest bin; quieter bins are raised to that floor."""
WHISPER_OFFSET = 4.0
WHISPER_SCALE = 4.0
"""Whisper maps log10 power x to (x + 4) / 4, roughly [-1, 1] for speech."""


def kaldi_fbank(waveform: Tensor, sample_rate: int, n_mels: int, frame_length_ms: float,
                frame_shift_ms: float) -> Tensor:
    """Kaldi's log-mel filterbank of (S,): (T, M), Hann window, no dither, no energy term (AST's settings)."""
    return torchaudio.compliance.kaldi.fbank(
        waveform[None], sample_frequency=sample_rate, num_mel_bins=n_mels, frame_length=frame_length_ms,
        frame_shift=frame_shift_ms, window_type="hanning", dither=0.0, htk_compat=True, use_energy=False)


def whisper_log_mel(waveform: Tensor, sample_rate: int, n_mels: int, n_fft: int, hop: int) -> Tensor:
    """Whisper's log-mel of (S,): (T, M) = (S // hop, n_mels); S must exceed n_fft // 2 (reflect padding).

    Power of a centered STFT with a periodic Hann window, Slaney-normalized mel filters from 0 Hz to Nyquist,
    log10 floored at 1e-10 and at 8 decades below the clip's peak, then (x + 4) / 4.
    """
    window, filters = _whisper_tables(sample_rate, n_mels, n_fft)
    spectrum = torch.stft(waveform, n_fft, hop, window=window, center=True, pad_mode="reflect",
                          return_complex=True)  # (F, T + 1)
    power = spectrum[:, :-1].abs() ** 2
    log_mel = (filters.T @ power).clamp(min=WHISPER_LOG_FLOOR).log10()  # (M, T)
    log_mel = torch.maximum(log_mel, log_mel.max() - WHISPER_DYNAMIC_RANGE)
    return ((log_mel + WHISPER_OFFSET) / WHISPER_SCALE).T


@lru_cache(maxsize=8)
def _whisper_tables(sample_rate: int, n_mels: int, n_fft: int) -> tuple[Tensor, Tensor]:
    """The Hann window (n_fft,) and mel filters (F, M) of one setting, built once."""
    filters = torchaudio.functional.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate,
                                                    norm="slaney", mel_scale="slaney")
    return torch.hann_window(n_fft), filters


def mask_along(features: Tensor, axis: int, widest: int, generator: torch.Generator | None) -> Tensor:
    """One SpecAugment mask on (T, M): a band of width ~ U[0, widest) at a uniform start along ``axis`` set to 0.

    Draws as ``torchaudio.functional.mask_along_axis`` does (width, then start), from ``generator`` so a
    caller can make augmentation a pure function of a seed.
    """
    size = features.shape[axis]
    width = torch.rand(1, generator=generator) * min(widest, size)
    start = torch.rand(1, generator=generator) * (size - width)
    begin, end = int(start), int(start) + int(width)
    band = (torch.arange(size) >= begin) & (torch.arange(size) < end)
    return features.masked_fill(band[:, None] if axis == 0 else band[None, :], 0.0)
