import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.transforms import v2

from polytrain.errors import DataError
from polytrain.tokenizers.image import ImageTokenizer, ImageTokenizerConfig, patchify


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


def test_linear_on_patches_equals_timm_patch_embed():
    torch.manual_seed(0)
    embed = timm.layers.PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=24)
    image = torch.randn(3, 32, 32)
    tokens = patchify(image, 8)
    ours = tokens.values @ embed.proj.weight.flatten(1).T + embed.proj.bias
    theirs = embed(image[None])[0]
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_resize_and_center_crop_match_torchvision():
    cfg = ImageTokenizerConfig(size=32, patch_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = torch.rand(3, 40, 61)
    reference = v2.Compose([v2.Resize(32, antialias=True), v2.CenterCrop(32)])(image)
    assert torch.allclose(ImageTokenizer(cfg).pixels(image), reference, atol=1e-5)


def test_normalization_uses_mean_and_std():
    cfg = ImageTokenizerConfig(size=4, patch_size=2, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    pixels = ImageTokenizer(cfg).pixels(torch.ones(3, 4, 4))
    assert pixels[:, 0, 0].tolist() == pytest.approx([1.0, 3.0, 0.5])


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "I;16"])
def test_pil_modes_are_converted(tmp_path, mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).convert(mode)
    path = tmp_path / "x.png"
    image.save(path)
    for channels in (1, 3):
        tokens = ImageTokenizer(ImageTokenizerConfig(size=16, patch_size=8, channels=channels))(path)
        assert tuple(tokens.values.shape) == (4, channels * 64)
        assert torch.isfinite(tokens.values).all()


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
