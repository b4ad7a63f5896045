"""Image: decode, resize (shorter side + center crop), normalize, cut into ViT patches.

A patch's features are ordered (channel, row, col), the order in which a
ViT's patch-embedding convolution (weight ``(dim, C, p, p)``) reads them, so
``Linear(C*p*p, dim)`` with that weight flattened gives the same embedding.

Shape legend: C channels, H/W image height/width in pixels, p patch side.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from polytrain.errors import ConfigError, DataError
from polytrain.tokens import EmbedSpec, Tokens

MAX_PIXELS = 64_000_000
"""Images with more pixels are refused from their header, before the pixels are decoded."""


@dataclass(frozen=True)
class ImageTokenizerConfig:
    size: int = 224
    """Side of the square the image is resized and center-cropped to, in pixels."""
    patch_size: int = 16
    """Side of one square patch, in pixels; must divide ``size``."""
    channels: int = 3
    """3 reads images as RGB, 1 as grayscale."""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted after scaling pixels to [0, 1] (first entry used when channels=1)."""
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel std divided by after subtracting the mean."""

    def check(self) -> None:
        if self.patch_size <= 0 or self.size % self.patch_size:
            raise ConfigError("patch_size", self.patch_size, f"must be positive and divide size={self.size}")
        if self.channels not in (1, 3):
            raise ConfigError("channels", self.channels, "must be 1 (grayscale) or 3 (RGB)")
        if min(self.std) <= 0:
            raise ConfigError("std", self.std, "every entry must be > 0")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.size // self.patch_size


class ImageTokenizer:
    modality = "image"

    def __init__(self, cfg: ImageTokenizerConfig):
        self.cfg = cfg
        self.mean = torch.tensor(cfg.mean[: cfg.channels]).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std[: cfg.channels]).view(-1, 1, 1)

    def __call__(self, image: str | Path | Image.Image | Tensor | np.ndarray) -> Tokens:
        """Patches (N, C*p*p) of ``image`` with their (row, col) grid positions."""
        pixels = self.pixels(image)
        return patchify(pixels, self.cfg.patch_size)

    def pixels(self, image: str | Path | Image.Image | Tensor | np.ndarray) -> Tensor:
        """``image`` resized, cropped and normalized: (C, size, size) float32."""
        if isinstance(image, (str, Path)):
            image = read_image(image)
        if isinstance(image, Image.Image):
            image = pil_to_tensor(image, self.cfg.channels)
        elif isinstance(image, np.ndarray):
            image = torch.from_numpy(image)
        pixels = image.float()
        if pixels.dim() == 2:
            pixels = pixels.unsqueeze(0)
        if pixels.dim() != 3 or pixels.shape[0] != self.cfg.channels:
            raise DataError(f"image tensor of shape {tuple(image.shape)} is not ({self.cfg.channels}, H, W) in [0, 1]")
        return (resize_center_crop(pixels, self.cfg.size) - self.mean) / self.std

    def embed_spec(self) -> EmbedSpec:
        return EmbedSpec("image", self.cfg.channels * self.cfg.patch_size**2, (self.cfg.grid, self.cfg.grid))


def read_image(path: str | Path) -> Image.Image:
    """Open an image file, refusing undecodable files and oversized images by their header."""
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise DataError(f"{path}: {width}x{height} image has more than {MAX_PIXELS} pixels; refused before decoding")
    try:
        image.load()
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: image data is corrupt or truncated ({err})") from None
    return image


def pil_to_tensor(image: Image.Image, channels: int) -> Tensor:
    """(C, H, W) float32 in [0, 1]."""
    image = image.convert("RGB" if channels == 3 else "L")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).reshape(image.height, image.width, channels).permute(2, 0, 1)


def resize_center_crop(pixels: Tensor, size: int) -> Tensor:
    """Scale (C, H, W) so the shorter side is ``size`` (bilinear, antialiased), then crop the center square.

    Rounding follows torchvision's ``Resize(size)`` + ``CenterCrop(size)`` (the long side is
    truncated, the crop offset rounded), so the pixels equal timm's eval transform.
    """
    _, height, width = pixels.shape
    if (height, width) != (size, size):
        short, long = sorted((height, width))
        scaled_long = int(size * long / short)
        new_h, new_w = (size, scaled_long) if height <= width else (scaled_long, size)
        pixels = F.interpolate(pixels[None], size=(new_h, new_w), mode="bilinear", antialias=True,
                               align_corners=False)[0]
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        pixels = pixels[:, top: top + size, left: left + size]
    return pixels


def patchify(pixels: Tensor, patch: int) -> Tokens:
    """Cut (C, H, W) into (H/p * W/p, C*p*p) patches, row-major, features in (C, p, p) order."""
    channels, height, width = pixels.shape
    rows, cols = height // patch, width // patch
    patches = (pixels[:, : rows * patch, : cols * patch]
               .reshape(channels, rows, patch, cols, patch)
               .permute(1, 3, 0, 2, 4)  # rows, cols, C, p, p
               .reshape(rows * cols, channels * patch * patch))
    grid_r, grid_c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    positions = torch.stack([grid_r.flatten(), grid_c.flatten()], dim=1)
    return Tokens(patches.contiguous(), positions, "image")
