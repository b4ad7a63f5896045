"""timm's ViT in and out: features and logits, training, export to a folder and a file timm loads (fp32, CPU)."""

import pytest
import torch
from safetensors.torch import save_file

from polytrain.config.registries import PRESETS
from polytrain.models.convert.external import load_state, read_external, write_external
from polytrain.models.convert.rules import ConversionError
from polytrain.models.presets import build
from polytrain.tokenizers.image import patchify
from polytrain.tokens import Segment, TaskBatch
from tests.models.convert_checks import TOLERANCE, max_diff, perturbed, trained

timm = pytest.importorskip("timm")

ARGS = dict(embed_dim=64, depth=2, num_heads=4, img_size=32, patch_size=8, num_classes=5)
"""A tiny ViT: 16 patches of 8x8 from 32x32 images."""


def images(batch: int, side: int, patch: int) -> tuple[torch.Tensor, Segment]:
    pixels = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
    return pixels, Segment.collate([patchify(p, patch) for p in pixels])


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "vit_base_patch16_224.augreg_in21k"])
def test_round_trip_keeps_features_and_logits(name, tmp_path):
    torch.manual_seed(0)
    reference = perturbed(timm.create_model(name.split(".")[0], pretrained=False, **ARGS))
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    model = read_external(tmp_path / "vit.safetensors", timm_model=name, model_args=ARGS).build("classify").eval()
    pixels, patches = images(2, 32, 8)
    batch = TaskBatch(patches, torch.tensor([1, 4]))
    with torch.no_grad():
        features = model.backbone.encode(model.embed(patches))
        assert max_diff(features, reference.forward_features(pixels)) <= TOLERANCE
        before = model.heads["classify"](model, batch)
        assert max_diff(before, reference(pixels)) <= TOLERANCE
    trained(model, "classify", batch)
    with torch.no_grad():
        after = model.heads["classify"](model, batch)
    assert max_diff(after, before) > 1e-3
    config = write_external(model, "classify", "timm", tmp_path / "exported")
    from_folder = timm.create_model(f"local-dir:{tmp_path / 'exported'}", pretrained=True).eval()
    from_file = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / "exported" / "model.safetensors"),
                                                              num_classes=ARGS["num_classes"])).eval()
    with torch.no_grad():
        for exported in (from_folder, from_file):
            assert max_diff(after, exported(pixels)) <= TOLERANCE


def test_a_named_size_exports_under_its_own_name(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    model = build(PRESETS.get("vit_tiny_patch16_224")).eval()
    load_state(model, "classify", "timm", reference.state_dict())
    config = write_external(model, "classify", "timm", tmp_path)
    assert config["architecture"] == "vit_tiny_patch16_224"
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    fresh.load_state_dict(read_external(tmp_path).state, strict=True)
    pixels, patches = images(1, 224, 16)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(pixels), reference(pixels))
        assert max_diff(model.heads["classify"](model, TaskBatch(patches, torch.zeros(1, dtype=torch.long))),
                        reference(pixels)) <= TOLERANCE


@pytest.mark.parametrize("name, args, message", [
    ("vit_base_patch16_eva_224", {}, "not a ViT polytrain can express"),
    ("vit_giant_patch14_dinov2", {}, "SwiGLU"),
    ("vit_small_patch16_224", dict(qk_norm=True), "qk_norm=True"),
    ("vit_base_patch16_clip_224", dict(qk_norm=True), "qk_norm=True"),
    ("vit_small_patch16_224", dict(block_fn="x"), "'block_fn' is not one polytrain knows"),
])
def test_vits_polytrain_cannot_express_are_refused_naming_the_setting(name, args, message, tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConversionError, match=message):
        read_external(tmp_path / "w.safetensors", timm_model=name, model_args=args)
