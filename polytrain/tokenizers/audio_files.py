"""Audio input: files (WAV, FLAC, OGG, MP3 and whatever else libsndfile decodes; by path or as their bytes) and
sample arrays -> float32.

libsndfile reads a WAV whose data stops short of what its header declares
without complaint (it just returns fewer frames), so WAV headers are checked
here against the file's size.
"""

import io
from pathlib import Path

import numpy as np
import soundfile
import torch
from torch import Tensor

from polytrain.errors import DataError

UNKNOWN_WAV_LENGTHS = (0, 0xFFFFFFFF)
"""Data-chunk sizes that streaming writers put in a WAV header when they do not know the length yet."""


def read_audio(path: str | Path | bytes) -> tuple[np.ndarray, int]:
    """(channels, S) float32 samples and the file's sample rate; ``path`` may be the file's bytes."""
    if isinstance(path, bytes):
        name, data = f"audio file of {len(path)} bytes", path
    elif not Path(path).is_file():
        raise DataError(f"{path}: audio file not found")
    else:
        try:
            name, data = path, Path(path).read_bytes()
        except OSError as err:
            raise DataError(f"{path}: cannot read the audio file ({err.strerror})") from None
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, TypeError) as err:
        raise DataError(f"{name}: not a readable audio file ({err})") from None
    declared = wav_data_bytes(data)
    if declared is not None and declared[0] not in UNKNOWN_WAV_LENGTHS and declared[0] > declared[1]:
        raise DataError(f"{name}: truncated WAV: its header declares {declared[0]} bytes of audio, the file holds "
                        f"{declared[1]}")
    return samples.T, rate


def wav_data_bytes(data: bytes) -> tuple[int, int] | None:
    """(bytes the ``data`` chunk declares, bytes after its header in the file) of a RIFF WAVE file, else None."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= len(data):
        chunk = data[offset: offset + 8]
        length = int.from_bytes(chunk[4:], "little")
        if chunk[:4] == b"data":
            return length, len(data) - offset - 8
        offset += 8 + length + (length & 1)  # chunks are padded to an even size
    return None


def samples_to_float(audio: Tensor | np.ndarray) -> Tensor:
    """Samples as float32: floats as they are, signed PCM scaled by its full scale (int16 / 32768), uint8 PCM
    centered on 128."""
    samples = torch.from_numpy(np.ascontiguousarray(audio)) if isinstance(audio, np.ndarray) else audio
    if not isinstance(samples, Tensor):
        raise DataError(f"audio is a {type(audio).__name__}; give a path, a tensor or an array")
    if samples.is_floating_point():
        return samples.float()
    if samples.dtype == torch.uint8:
        return (samples.float() - 128) / 128
    if samples.dtype in (torch.int16, torch.int32):
        return samples.float() / -torch.iinfo(samples.dtype).min
    raise DataError(f"audio samples of type {samples.dtype} are ambiguous; give float, int16, int32 or uint8 PCM")
