"""Motion recordings -> tokens: each token is ``patch_samples`` consecutive time steps of every axis.

A recording is a float array (time steps, axes) in m/s^2: a ``.npy`` file (read with
``allow_pickle=False``, so a crafted file cannot run code), a ``.csv`` file (one row per
time step, one column per axis), or an array/tensor handed over directly.

Shape legend: S time steps, C axes (channels), P patches, D = patch_samples * C features per patch.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from polytrain.errors import ConfigError, DataError
from polytrain.tokenizers.overflow import Overflow, OverflowPolicy
from polytrain.tokens import EmbedSpec, Tokens

GRAVITY = 9.81
"""m/s^2: values are divided by it, so they are of order one."""


@dataclass(frozen=True)
class MotionTokenizerConfig:
    axes: int = 3
    """Channels per time step (3 for an accelerometer's x, y, z)."""
    sample_rate: int = 50
    """Time steps per second of the recordings, in Hz (they are not resampled)."""
    patch_samples: int = 10
    """Time steps per token (0.2 s at 50 Hz)."""
    max_seconds: float = 3.0
    """Longest recording, in seconds; sizes the embedder's position table."""
    overflow: OverflowPolicy = "truncate"
    """A longer recording: truncate keeps its start (counted and logged); error refuses it."""
    remove_gravity: bool = True
    """Subtract each axis's mean over the recording: the constant pull of gravity (however the device is
    worn) goes, the motion stays."""

    def check(self) -> None:
        for key in ("axes", "sample_rate", "patch_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(key, getattr(self, key), "must be >= 1")
        if self.max_samples < self.patch_samples:
            raise ConfigError("max_seconds", self.max_seconds, f"must hold one patch ({self.patch_samples} samples)")

    @property
    def max_samples(self) -> int:
        return int(self.max_seconds * self.sample_rate)

    @property
    def max_patches(self) -> int:
        return self.max_samples // self.patch_samples


class MotionTokenizer:
    modality = "motion"
    config_class = MotionTokenizerConfig

    def __init__(self, cfg: MotionTokenizerConfig):
        self.cfg = cfg
        self.overflow = Overflow(cfg.overflow, "tokenizers.plugins.motion.max_seconds")

    def __call__(self, recording: str | Path | np.ndarray | torch.Tensor) -> Tokens:
        """Patches (P, D) in time order, at grid positions (0, 0), (0, 1), ...; a tail shorter than a patch is
        dropped."""
        name = str(recording) if isinstance(recording, (str, Path)) else f"motion {type(recording).__name__}"
        samples_SC = self.checked(read(recording) if isinstance(recording, (str, Path)) else recording, name)
        if self.cfg.remove_gravity:
            samples_SC = samples_SC - samples_SC.mean(dim=0)
        patches = samples_SC.shape[0] // self.cfg.patch_samples
        values_PD = (samples_SC[: patches * self.cfg.patch_samples] / GRAVITY).reshape(patches, -1)
        cols = torch.arange(patches)
        return Tokens(values_PD, torch.stack([torch.zeros_like(cols), cols], dim=1), self.modality)

    def checked(self, samples, name: str) -> torch.Tensor:
        """(S, C) float32, finite, at least one patch and at most ``max_seconds`` long."""
        samples_SC = torch.as_tensor(np.asarray(samples, dtype=np.float32))
        if samples_SC.dim() != 2 or samples_SC.shape[1] != self.cfg.axes:
            raise DataError(f"{name}: a recording must be (time steps, {self.cfg.axes} axes), got shape "
                            f"{tuple(samples_SC.shape)}")
        if not torch.isfinite(samples_SC).all():
            raise DataError(f"{name}: recording contains NaN or infinite values")
        if samples_SC.shape[0] < self.cfg.patch_samples:
            raise DataError(f"{name}: {samples_SC.shape[0]} time steps, fewer than one patch "
                            f"(patch_samples={self.cfg.patch_samples})")
        if samples_SC.shape[0] > self.cfg.max_samples:
            self.overflow(name, f"{samples_SC.shape[0] / self.cfg.sample_rate:.2f} s", f"{self.cfg.max_seconds:g} s")
            samples_SC = samples_SC[: self.cfg.max_samples]
        return samples_SC

    def embed_spec(self) -> EmbedSpec:
        return EmbedSpec(self.modality, self.cfg.patch_samples * self.cfg.axes, (1, self.cfg.max_patches))


def read(path: str | Path) -> np.ndarray:
    """The array in a ``.npy`` or ``.csv`` file; anything unreadable is a ``DataError`` naming the file."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".csv":
            return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the recording ({err})") from None
    raise DataError(f"{path}: unknown recording format {path.suffix!r}; use .npy or .csv")
