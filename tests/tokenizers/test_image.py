import dataclasses
import struct
import zlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from polytrain.config.tokenizers import ImageTokenizerConfig
from polytrain.errors import ConfigError, DataError
from polytrain.schema import from_dict
from polytrain.tokenizers.image import ImageTokenizer, patchify


@pytest.mark.parametrize("size, patch, channels, expected", [
    (224, 16, 3, (196, 768)),  # 14 x 14 patches of 3*16*16
    (8, 4, 1, (4, 16)),  # the quick start's digits: 2 x 2 patches of 1*4*4
    (32, 8, 3, (16, 192)),
])
def test_patch_count_and_size(size, patch, channels, expected):
    tok = ImageTokenizer(ImageTokenizerConfig(size=size, patch_size=patch, channels=channels))
    tokens = tok(torch.rand(channels, size + 10, size + 30))
    assert tuple(tokens.values.shape) == expected
    assert tok.embed_spec().input_dim == expected[1]


def test_patch_holds_its_pixels_in_channel_row_col_order():
    pixels = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8)
    tokens = patchify(pixels, 4)
    assert tokens.positions.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    for i, (r, c) in enumerate(tokens.positions.tolist()):
        assert torch.equal(tokens.values[i], pixels[:, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4].flatten())


def test_patches_through_a_timm_vit_patch_embedding_give_its_embedding():
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8)
    embed = vit.patch_embed
    linear = torch.nn.Linear(3 * 8 * 8, embed.proj.out_channels)
    with torch.no_grad():  # the ViT's conv weights, copied into a Linear over flattened patches
        linear.weight.copy_(embed.proj.weight.flatten(1))
        linear.bias.copy_(embed.proj.bias)
    image = torch.rand(3, 45, 40)
    tok = ImageTokenizer(ImageTokenizerConfig(size=32, patch_size=8, norm="imagenet"))
    tokens = tok(image)
    theirs = embed(tok.pixels(image)[None])[0]  # (16, 192), row-major over the 4 x 4 grid
    assert torch.allclose(linear(tokens.values), theirs, atol=1e-6)
    assert tokens.positions.tolist() == [[r, c] for r in range(4) for c in range(4)]


@pytest.mark.parametrize("channels, height, width, grid", [
    (3, 100, 170, (3, 5)),  # fit: scale sqrt(16 * 16^2 / (100 * 170)) = 0.49 -> 3.07 x 5.22 patches
    (1, 61, 47, (4, 3)),  # native size, 3.81 x 2.94 patches rounded: grayscale through a 1-channel ViT
])
def test_variable_resolution_patches_through_a_timm_vit_with_dynamic_size(channels, height, width, grid):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True, in_chans=channels)
    embed = vit.patch_embed  # timm's any-size path: (B, C, H, W) -> (B, H/16, W/16, dim)
    linear = torch.nn.Linear(channels * 16 * 16, embed.proj.out_channels)
    with torch.no_grad():
        linear.weight.copy_(embed.proj.weight.flatten(1))
        linear.bias.copy_(embed.proj.bias)
    cfg = ImageTokenizerConfig(size=224, patch_size=16, channels=channels, resize="fit", max_patches=16,
                               norm="inception")
    tok = ImageTokenizer(cfg)
    image = torch.rand(channels, height, width)
    tokens = tok(image)
    theirs = embed(tok.pixels(image)[None])[0]  # (rows, cols, dim)
    assert tuple(theirs.shape[:2]) == grid
    assert torch.allclose(linear(tokens.values), theirs.flatten(0, 1), atol=1e-6)
    rows, cols = grid
    assert tokens.positions.tolist() == [[r, c] for r in range(rows) for c in range(cols)]


def test_resize_and_center_crop_match_torchvision():
    cfg = ImageTokenizerConfig(size=32, patch_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = torch.rand(3, 40, 61)
    reference = v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(32)])(image)
    assert torch.allclose(ImageTokenizer(cfg).pixels(image), reference, atol=1e-5)


def test_normalization_uses_mean_and_std():
    cfg = ImageTokenizerConfig(size=4, patch_size=2, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    pixels = ImageTokenizer(cfg).pixels(torch.ones(3, 4, 4))
    assert pixels[:, 0, 0].tolist() == pytest.approx([1.0, 3.0, 0.5])


def test_missing_and_undecodable_files_name_the_path(tmp_path):
    tok = ImageTokenizer(ImageTokenizerConfig(size=8, patch_size=4))
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.png'}: image file not found"):
        tok(tmp_path / "nope.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=f"{junk}: not a readable image"):
        tok(junk)
    good = tmp_path / "cut.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8) + 100).save(good)
    cut = tmp_path / "truncated.png"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(DataError, match=f"{cut}:"):
        tok(cut)


RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 256, (30, 44, 3), dtype=np.uint8)  # H=30, W=44: orientation shows


def reference_pixels(path, size, mode=ImageReadMode.RGB, scale=255.0):
    """torchvision's own decoder (EXIF applied) + Resize + CenterCrop: what timm's eval transform computes."""
    decoded = decode_image(str(path), mode=mode, apply_exif_orientation=True).float() / scale
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])(decoded)


PLAIN = ImageTokenizerConfig(size=16, patch_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("suffix, save, atol", [
    ("png", {}, 1e-5),
    ("jpg", {"quality": 95}, 2 / 255),  # two JPEG decoders may differ by a level
    ("webp", {"lossless": True}, 1e-5),
    ("bmp", {}, 1e-5),
    ("tiff", {}, 1e-5),
])
def test_rgb_files_equal_torchvision_decode(tmp_path, suffix, save, atol):
    path = tmp_path / f"x.{suffix}"
    Image.fromarray(PICTURE).save(path, **save)
    if suffix in ("bmp", "tiff"):  # torchvision cannot decode these: compare with Pillow's pixels
        reference = v2.Compose([v2.Resize(16, antialias=True), v2.CenterCrop(16)])(
            torch.from_numpy(PICTURE).permute(2, 0, 1).float() / 255)
    else:
        reference = reference_pixels(path, 16)
    assert torch.allclose(ImageTokenizer(PLAIN).pixels(path), reference, atol=atol)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_rotated_file_is_turned_upright(tmp_path, suffix):
    exif = Image.Exif()
    exif[0x0112] = 6  # camera turned: the image must be rotated 90 degrees clockwise to display
    path = tmp_path / f"rotated.{suffix}"
    Image.fromarray(PICTURE).save(path, exif=exif, **({"quality": 95} if suffix == "jpg" else {}))
    upright = ImageTokenizer(PLAIN).pixels(path)
    atol = 2 / 255 if suffix == "jpg" else 1e-5
    assert torch.allclose(upright, reference_pixels(path, 16), atol=atol)
    if suffix == "png":  # lossless: also equal to rotating the original by hand
        turned = torch.from_numpy(np.rot90(PICTURE, k=-1).copy()).permute(2, 0, 1).float() / 255
        assert torch.allclose(upright, v2.Compose([v2.Resize(16), v2.CenterCrop(16)])(turned), atol=1e-5)


def test_grayscale_and_palette_files(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(PICTURE[..., 0]).save(gray)
    palette = tmp_path / "palette.gif"
    Image.fromarray(PICTURE).quantize(16).save(palette)
    gray_cfg = ImageTokenizerConfig(size=16, patch_size=8, channels=1, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert torch.allclose(ImageTokenizer(gray_cfg).pixels(gray), reference_pixels(gray, 16, ImageReadMode.GRAY),
                          atol=1e-5)
    assert torch.allclose(ImageTokenizer(PLAIN).pixels(palette), reference_pixels(palette, 16), atol=1e-5)
    as_rgb = ImageTokenizer(PLAIN).pixels(gray)
    assert torch.equal(as_rgb[0], as_rgb[2])  # gray read as RGB: three equal channels


def test_sixteen_bit_png_keeps_its_depth(tmp_path):
    depth16 = RNG.integers(0, 65536, (16, 16)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(depth16).save(path)
    gray_cfg = ImageTokenizerConfig(size=16, patch_size=8, channels=1, mean=(0.0,) * 3, std=(1.0,) * 3)
    pixels = ImageTokenizer(gray_cfg).pixels(path)
    assert torch.allclose(pixels[0], torch.from_numpy(depth16.astype(np.float32) / 65535), atol=1e-6)
    assert torch.allclose(pixels, reference_pixels(path, 16, ImageReadMode.UNCHANGED, 65535.0), atol=1e-6)


def test_transparent_pixels_are_composited_onto_white(tmp_path):
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 51  # red at alpha 0.2
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    pixels = ImageTokenizer(PLAIN).pixels(path)
    # red over white at alpha 0.2: R = 1*0.2 + 1*0.8, G = B = 0*0.2 + 1*0.8
    assert pixels[:, 3, 3].tolist() == pytest.approx([1.0, 0.8, 0.8], abs=1e-6)
    assert torch.allclose(ImageTokenizer(PLAIN).pixels(rgba), pixels, atol=1e-6)  # same from an (H, W, 4) array


def over_white(rgba: np.ndarray) -> torch.Tensor:
    """(H, W, C+1) uint8 with alpha last -> (C, H, W) float, composited onto white by the closed form."""
    color, alpha = rgba[..., :-1] / 255.0, rgba[..., -1:] / 255.0
    return torch.from_numpy(color * alpha + (1 - alpha)).permute(2, 0, 1).float()


def test_transparent_palette_and_gray_alpha_files_are_composited_onto_white(tmp_path):
    path = tmp_path / "palette.png"
    Image.fromarray(PICTURE).quantize(16).save(path, transparency=3)  # entry 3 is transparent: white it becomes
    rgba = decode_image(str(path), mode=ImageReadMode.RGB_ALPHA).permute(1, 2, 0).numpy()  # torchvision's decode
    expected = over_white(rgba)
    assert (expected == 1.0).all(0).any()  # some pixels did go white
    resize = v2.Compose([v2.Resize(16), v2.CenterCrop(16)])
    assert torch.allclose(ImageTokenizer(PLAIN).pixels(path), resize(expected), atol=1e-5)
    gray_alpha = np.stack([PICTURE[..., 0], PICTURE[..., 1]], axis=-1)  # (H, W, 2): gray, alpha
    path = tmp_path / "gray_alpha.png"
    Image.fromarray(gray_alpha, "LA").save(path)
    gray_cfg = ImageTokenizerConfig(size=16, patch_size=8, channels=1, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert torch.allclose(ImageTokenizer(gray_cfg).pixels(path), resize(over_white(gray_alpha)), atol=1e-5)


def test_arrays_are_channels_last_tensors_channels_first(tmp_path):
    path = tmp_path / "x.png"
    Image.fromarray(PICTURE).save(path)
    tok = ImageTokenizer(PLAIN)
    from_file = tok.pixels(path)
    assert torch.allclose(tok.pixels(PICTURE), from_file, atol=1e-6)  # (H, W, 3) uint8
    chw = torch.from_numpy(PICTURE).permute(2, 0, 1)
    assert torch.allclose(tok.pixels(chw), from_file, atol=1e-6)  # (3, H, W) uint8 tensor
    assert torch.allclose(tok.pixels(chw.float() / 255), from_file, atol=1e-6)  # float in [0, 1]
    gray = ImageTokenizer(ImageTokenizerConfig(size=16, patch_size=8, channels=1, mean=(0.,) * 3, std=(1.,) * 3))
    luma = chw.float().div(255).mul(torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
    assert torch.allclose(gray.pixels(chw), v2.Compose([v2.Resize(16), v2.CenterCrop(16)])(luma), atol=1e-5)


@pytest.mark.parametrize("image, message", [
    (torch.linspace(0, 2, 1200).reshape(3, 20, 20), r"must lie in \[0, 1\], these span \[0"),
    (torch.full((3, 20, 20), float("nan")), "NaN or infinite"),
    (torch.zeros(3, 20, 20, dtype=torch.int64), "torch.int64 are ambiguous"),
    (torch.zeros(5, 20, 20), r"shape \(5, 20, 20\) is not \(H, W\) or \(C, H, W\)"),
    (np.zeros((20, 20, 7), dtype=np.uint8), r"shape \(20, 20, 7\) is not \(H, W\) or \(H, W, C\)"),
    ([[0.5]], "is a list; give a path, PIL image, tensor or array"),
])
def test_bad_arrays_are_refused(image, message):
    with pytest.raises(DataError, match=message):
        ImageTokenizer(PLAIN)(image)


def test_pad_policy_equals_torchvision_longer_side_resize_and_padding_crop():
    image = torch.rand(3, 20, 50)
    cfg = ImageTokenizerConfig(size=32, patch_size=8, resize="pad", mean=(0.0,) * 3, std=(1.0,) * 3)
    reference = v2.Compose([v2.Resize(size=None, max_size=32, antialias=True), v2.CenterCrop(32)])(image)
    ours = ImageTokenizer(cfg).pixels(image)
    assert ours.shape == (3, 32, 32) and torch.allclose(ours, reference, atol=1e-5)
    normalized = ImageTokenizer(ImageTokenizerConfig(size=32, patch_size=8, resize="pad")).pixels(image)
    assert normalized[:, 0].abs().max() == 0  # the border is the mean color: 0 after normalization


@pytest.mark.parametrize("size, height, width, max_patches, grid", [
    # scale = min(1, size / longest side, sqrt(budget * 16^2 / (H * W))); sides rounded to whole patches
    (64, 64, 64, 0, (4, 4)),  # native: 4 x 4 patches of 16 px fill the default budget (64 / 16)^2 = 16
    (64, 48, 64, 0, (3, 4)),  # native, 12 patches
    (64, 100, 400, 0, (1, 4)),  # the longest side is capped at size: scale 0.16 -> 16 x 64 px
    (256, 160, 240, 16, (3, 5)),  # the budget binds: scale 0.327 -> 3.27 x 4.90 -> 3 x 5
    (64, 64, 64, 9, (3, 3)),  # scale 0.75
    (256, 56, 88, 5, (2, 2)),  # 1.78 x 2.80 rounds to 2 x 3 = 6 > 5: a patch off the longer side
])
def test_fit_policy_keeps_aspect_within_the_budget(size, height, width, max_patches, grid):
    cfg = ImageTokenizerConfig(size=size, patch_size=16, resize="fit", max_patches=max_patches, max_aspect=5,
                               mean=(0.0,) * 3, std=(1.0,) * 3)
    image = torch.rand(3, height, width)
    tokens = ImageTokenizer(cfg)(image)
    rows, cols = grid
    assert len(tokens) == rows * cols and tokens.positions.max(0).values.tolist() == [rows - 1, cols - 1]
    reference = v2.Resize((rows * 16, cols * 16), antialias=True)(image)
    assert torch.allclose(ImageTokenizer(cfg).pixels(image), reference, atol=1e-5)


def test_normalization_presets_are_timms():
    from timm.data import constants

    for name, prefix in [("imagenet", "IMAGENET_DEFAULT"), ("inception", "IMAGENET_INCEPTION"),
                         ("openai_clip", "OPENAI_CLIP"), ("dpn", "IMAGENET_DPN")]:
        cfg = ImageTokenizerConfig(norm=name)
        cfg.check()
        mean, std = cfg.normalization
        assert mean == pytest.approx(getattr(constants, f"{prefix}_MEAN"))
        assert std == pytest.approx(getattr(constants, f"{prefix}_STD"))


@pytest.mark.parametrize("cfg, message", [
    (ImageTokenizerConfig(norm="imagenett"), "norm='imagenett': unknown preset; known: dpn, imagenet, inception"),
    (ImageTokenizerConfig(norm="imagenet", mean=(0.1, 0.1, 0.1)), "set either norm or mean/std"),
    (ImageTokenizerConfig(max_patches=-1), "max_patches=-1"),
    (ImageTokenizerConfig(resize="squash"), None),  # the loader rejects it (Literal); check() leaves it
])
def test_bad_image_config(cfg, message):
    if message is None:
        from polytrain.config import load_config

        with pytest.raises(ConfigError, match=r"tokenizers.image.resize='squash': must be one of 'crop', 'pad'"):
            load_config(None, ["data.tasks.t.head=decoder_only", "data.tasks.t.train=x", "data.tasks.t.val=x",
                               "tokenizers.image.resize=squash"])
        return
    with pytest.raises(ConfigError, match=message):
        from_dict(ImageTokenizerConfig, dataclasses.asdict(cfg))


def test_tiny_and_elongated_images_are_refused(tmp_path):
    dot = tmp_path / "dot.png"
    Image.fromarray(np.zeros((1, 1, 3), dtype=np.uint8)).save(dot)
    with pytest.raises(DataError, match=f"{dot}: 1x1 image has a side shorter than min_side=8 pixels"):
        ImageTokenizer(PLAIN)(dot)
    strip = tmp_path / "strip.png"
    Image.fromarray(np.zeros((10, 300, 3), dtype=np.uint8)).save(strip)
    with pytest.raises(DataError, match=f"{strip}: 300x10 image is more than max_aspect=20.0 times"):
        ImageTokenizer(PLAIN)(strip)


def png_header_only(path, width, height):
    """A PNG whose IHDR declares ``width`` x ``height`` RGB, followed by a few bytes of data: tiny on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_huge_image_is_refused_from_its_header_by_polytrains_limit(tmp_path):
    bomb = tmp_path / "bomb.png"
    png_header_only(bomb, 20000, 20000)
    assert bomb.stat().st_size < 200
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match=f"{bomb}: 20000x20000 image has 400000000 pixels, more than 64000000; "
                                        "refused before decoding"):
        ImageTokenizer(PLAIN)(bomb)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # Pillow's own limit is lifted only while reading the header
    with pytest.raises(Image.DecompressionBombError):  # ... which Pillow, left alone, would have raised itself
        Image.open(bomb)
