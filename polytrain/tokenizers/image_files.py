"""Image input: files (anything Pillow reads, by path or as their bytes), PIL images, tensors and arrays -> (C, H, W)
float32 in [0, 1].

Files are refused by their header when they are too large to decode, turned
upright by their EXIF orientation, and read at full depth (16-bit grayscale
PNGs keep their 16 bits; Pillow itself reads 16-bit color as 8-bit).
Transparent pixels are composited onto white.

Shape legend: C channels, H/W height/width in pixels.
"""

import io
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from polytrain.errors import DataError

MAX_PIXELS = 64_000_000
"""Images with more pixels are refused from their header, before the pixels are decoded."""
BACKGROUND = 1.0
"""What transparent pixels are composited onto: white."""
LUMA = (0.299, 0.587, 0.114)
"""RGB -> gray weights for tensors and arrays (ITU-R 601-2, the ones Pillow's "L" conversion uses)."""
ORIENTATION = 0x0112
"""The EXIF tag that says how the camera was held."""
WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}
"""Pillow modes deeper than 8 bits (16-bit PNG, TIFF) and their full-scale value; Pillow's own conversion
to 8 bits would clip them at 255 instead of scaling."""
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
INT_SCALE = {torch.uint8: 255, torch.uint16: 65535}
"""Full-scale value of the integer pixel types accepted from tensors and arrays."""

_PILLOW_LIMIT = threading.Lock()


def read_image(path: str | Path | bytes) -> Image.Image:
    """Open an image file (a path, or a file's bytes), refusing undecodable files and oversized images by their
    header; upright per EXIF."""
    name = f"image file of {len(path)} bytes" if isinstance(path, bytes) else path
    try:
        image = _open_header(io.BytesIO(path) if isinstance(path, bytes) else path)
    except FileNotFoundError:
        raise DataError(f"{name}: image file not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{name}: not a readable image ({err})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise DataError(f"{name}: {width}x{height} image has {width * height} pixels, more than "
                        f"{MAX_PIXELS}; refused before decoding")
    try:
        image.load()
        if image.getexif().get(ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError) as err:
        raise DataError(f"{name}: image data is corrupt or truncated ({err})") from None
    return image


def _open_header(path: str | Path | io.BytesIO) -> Image.Image:
    """``Image.open`` (header only) with Pillow's own decompression-bomb limit lifted, so that polytrain's
    ``MAX_PIXELS`` is the one limit that applies and its message names the file and the size."""
    with _PILLOW_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def pil_to_tensor(image: Image.Image, channels: int) -> Tensor:
    """(channels, H, W) float32 in [0, 1]; palette, gray, alpha and 16-bit modes converted."""
    if image.mode in WIDE_MODES:
        array = np.asarray(image, dtype=np.float32) / WIDE_MODES[image.mode]
        return to_channels(torch.from_numpy(array.clip(0.0, 1.0))[None], channels)
    if image.mode == "F":
        return to_channels(_checked_float(torch.from_numpy(np.asarray(image, dtype=np.float32))[None]), channels)
    alpha = image.mode in ALPHA_MODES or "transparency" in image.info
    image = image.convert(("RGBA" if alpha else "RGB") if channels == 3 else ("LA" if alpha else "L"))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return to_channels(torch.from_numpy(array).reshape(image.height, image.width, -1).permute(2, 0, 1), channels)


def array_to_tensor(image: Tensor | np.ndarray, channels: int) -> Tensor:
    """(channels, H, W) float32 in [0, 1] from a tensor (C, H, W) or (H, W), or an array (H, W, C) or (H, W).

    Tensors follow torchvision (channels first), arrays follow Pillow and NumPy (channels last); C is 1 (gray),
    2 (gray, alpha), 3 (RGB) or 4 (RGBA). uint8 is read as 0-255, uint16 as 0-65535, float as 0-1.
    """
    is_array = isinstance(image, np.ndarray)
    pixels = torch.from_numpy(np.ascontiguousarray(image)) if is_array else image
    if pixels.dim() == 2:
        pixels = pixels[None]
    elif pixels.dim() == 3 and is_array:
        pixels = pixels.permute(2, 0, 1)
    layout = "(H, W, C)" if is_array else "(C, H, W)"
    if pixels.dim() != 3 or not 1 <= pixels.shape[0] <= 4:
        raise DataError(f"image {type(image).__name__} of shape {tuple(image.shape)} is not (H, W) or {layout} "
                        f"with C in 1..4")
    if pixels.dtype in INT_SCALE:
        pixels = pixels.float() / INT_SCALE[pixels.dtype]
    elif pixels.dtype == torch.bool:
        pixels = pixels.float()
    elif pixels.is_floating_point():
        pixels = _checked_float(pixels.float())
    else:
        raise DataError(f"image pixels of type {pixels.dtype} are ambiguous; give uint8 (0-255), uint16 "
                        f"(0-65535) or float (0-1)")
    return to_channels(pixels, channels)


def _checked_float(pixels: Tensor) -> Tensor:
    if not torch.isfinite(pixels).all():
        raise DataError("image pixels contain NaN or infinite values")
    low, high = pixels.min().item(), pixels.max().item()
    if low < 0.0 or high > 1.0:
        raise DataError(f"float image pixels must lie in [0, 1], these span [{low:.4g}, {high:.4g}] (already "
                        f"normalized? give the raw image: the tokenizer normalizes)")
    return pixels


def to_channels(pixels: Tensor, channels: int) -> Tensor:
    """(c, H, W) with c in 1..4 (alpha last when c is 2 or 4) -> (channels, H, W): alpha over white, gray <-> RGB."""
    if pixels.shape[0] in (2, 4):
        color, alpha = pixels[:-1], pixels[-1:]
        pixels = color * alpha + BACKGROUND * (1 - alpha)
    if pixels.shape[0] == channels:
        return pixels
    if channels == 3:
        return pixels.expand(3, -1, -1).clone()
    return torch.tensordot(torch.tensor(LUMA), pixels, dims=1)[None]
