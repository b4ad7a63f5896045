"""Image: decode, resize (crop, pad or fit), normalize, cut into ViT patches with their 2-D grid positions.

A patch's features are ordered (channel, row, col), the order in which a
ViT's patch-embedding convolution (weight ``(dim, C, p, p)``) reads them, so
``Linear(C*p*p, dim)`` with that weight flattened gives the same embedding.

Shape legend: C channels, H/W image height/width in pixels, p patch side.
"""

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from polytrain.config.tokenizers import ImageTokenizerConfig
from polytrain.errors import DataError
from polytrain.tokenizers.image_files import array_to_tensor, pil_to_tensor, read_image
from polytrain.tokens import EmbedSpec, Tokens

ImageInput = str | Path | bytes | Image.Image | Tensor | np.ndarray



class ImageTokenizer:
    modality = "image"
    config_class = ImageTokenizerConfig

    def __init__(self, cfg: ImageTokenizerConfig):
        self.cfg = cfg
        mean, std = cfg.normalization
        self.mean = torch.tensor(mean[: cfg.channels]).view(-1, 1, 1)
        self.std = torch.tensor(std[: cfg.channels]).view(-1, 1, 1)

    def __call__(self, image: ImageInput) -> Tokens:
        """Patches (N, C*p*p) of ``image`` with their (row, col) grid positions."""
        return patchify(self.pixels(image), self.cfg.patch_size)

    def pixels(self, image: ImageInput) -> Tensor:
        """``image`` resized per ``resize`` and normalized: (C, H, W) float32, H and W multiples of the patch."""
        name = str(image) if isinstance(image, (str, Path)) else f"image {type(image).__name__}"
        if isinstance(image, (str, Path, bytes)):  # a file, by path or as its bytes (a prepared shard's)
            image = read_image(image)
        try:
            if isinstance(image, Image.Image):
                pixels = pil_to_tensor(image, self.cfg.channels)
            elif isinstance(image, (Tensor, np.ndarray)):
                pixels = array_to_tensor(image, self.cfg.channels)
            else:
                raise DataError(f"is a {type(image).__name__}; give a path, PIL image, tensor or array")
        except DataError as err:
            raise DataError(f"{name}: {err}") from None
        self.check_shape(pixels.shape[1], pixels.shape[2], name)
        size, patch, mode = self.cfg.size, self.cfg.patch_size, self.cfg.interpolation
        if self.cfg.resize == "crop":
            return self.normalize(resize_center_crop(pixels, size, int(size / self.cfg.crop_pct), mode))
        if self.cfg.resize == "stretch":
            return self.normalize(resize(pixels, size, size, mode))
        if self.cfg.resize == "pad":
            return pad_to_square(self.normalize(resize_longer_side(pixels, size, mode)), size)
        rows, cols = fit_grid(pixels.shape[1], pixels.shape[2], patch, self.cfg.grid, self.cfg.budget)
        return self.normalize(resize(pixels, rows * patch, cols * patch, mode))

    def normalize(self, pixels: Tensor) -> Tensor:
        return (pixels - self.mean) / self.std

    def check_shape(self, height: int, width: int, name: str) -> None:
        """Refuse images too small to hold a patch of their own, or too elongated to keep most of."""
        min_side = self.cfg.min_side or self.cfg.patch_size
        if min(height, width) < min_side:
            raise DataError(f"{name}: {width}x{height} image has a side shorter than min_side={min_side} pixels")
        if max(height, width) > self.cfg.max_aspect * min(height, width):
            raise DataError(f"{name}: {width}x{height} image is more than max_aspect={self.cfg.max_aspect} times "
                            f"longer than wide")

    def count(self, height: int, width: int) -> int:
        """Patches an image of ``height`` x ``width`` pixels gives, without decoding it (cost budgets count them)."""
        if self.cfg.resize in ("crop", "pad", "stretch"):
            return self.cfg.grid**2
        rows, cols = fit_grid(height, width, self.cfg.patch_size, self.cfg.grid, self.cfg.budget)
        return rows * cols

    def embed_spec(self) -> EmbedSpec:
        return EmbedSpec("image", self.cfg.channels * self.cfg.patch_size**2, (self.cfg.grid, self.cfg.grid))


def resize(pixels: Tensor, height: int, width: int, mode: str = "bilinear") -> Tensor:
    """(C, H, W) -> (C, height, width), bilinear or bicubic, antialiased (torchvision's default)."""
    if pixels.shape[1:] == (height, width):
        return pixels
    return F.interpolate(pixels[None], size=(height, width), mode=mode, antialias=True, align_corners=False)[0]


def resize_center_crop(pixels: Tensor, size: int, scale: int | None = None, mode: str = "bilinear") -> Tensor:
    """Scale (C, H, W) so the shorter side is ``scale`` (default ``size``; antialiased), then crop the center
    ``size`` square.

    Rounding follows torchvision's ``Resize(scale)`` + ``CenterCrop(size)`` (the long side is
    truncated, the crop offset rounded), so the pixels equal timm's eval transform (``scale`` = size / crop_pct).
    """
    _, height, width = pixels.shape
    short, long = sorted((height, width))
    scale = scale or size
    scaled_long = int(scale * long / short)
    new_h, new_w = (scale, scaled_long) if height <= width else (scaled_long, scale)
    pixels = resize(pixels, new_h, new_w, mode)
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return pixels[:, top: top + size, left: left + size]


def resize_longer_side(pixels: Tensor, size: int, mode: str = "bilinear") -> Tensor:
    """Scale (C, H, W) so the longer side is ``size``; the shorter is truncated, as torchvision's
    ``Resize(None, max_size=size)`` does."""
    _, height, width = pixels.shape
    short, long = sorted((height, width))
    scaled_short = max(1, int(size * short / long))
    return resize(pixels, *((scaled_short, size) if height <= width else (size, scaled_short)), mode)


def pad_to_square(pixels: Tensor, size: int) -> Tensor:
    """Center (C, h, w) on a (C, size, size) canvas of zeros (the odd pixel goes right/bottom, as torchvision's
    ``CenterCrop`` pads)."""
    _, height, width = pixels.shape
    left, top = (size - width) // 2, (size - height) // 2
    return F.pad(pixels, (left, size - width - left, top, size - height - top))


def fit_grid(height: int, width: int, patch: int, max_side: int, budget: int) -> tuple[int, int]:
    """(rows, cols) of patches for an H x W image that keeps its aspect ratio and native resolution, scaled
    down until rows * cols <= budget and both <= max_side; each side rounded to whole patches, at least one."""
    scale = min(1.0, max_side * patch / max(height, width), math.sqrt(budget * patch * patch / (height * width)))
    rows = min(max_side, max(1, round(height * scale / patch)))
    cols = min(max_side, max(1, round(width * scale / patch)))
    while rows * cols > budget:  # rounding up overshot: take a patch off the longer side
        if rows >= cols:
            rows -= 1
        else:
            cols -= 1
    return rows, cols


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
