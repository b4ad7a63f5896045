"""timm's plain ``VisionTransformer`` (``vit_<size>_patch<p>_<img>``) <-> polytrain encoder classifier.

The architecture comes from timm's own description of a checkpoint, its
``config.json``: the model name (``architecture``), the arguments it was
created with (``model_args``, which override the name's) and ``num_classes``
(or ``pretrained_cfg``'s).  Only the plain ViT fits: a class token with raster
positions that include it, pre-norm blocks (LayerNorm eps 1e-6), the final
norm and a linear head on the class token.  The patch convolution's
(E, C, p, p) weight is polytrain's (E, C*p*p) linear map over patches in
(channel, row, col) order.

Shape legend: E model dim, C channels, p patch side, N patches.
"""

import re

from torch import Tensor

from polytrain.config.model import BackboneConfig, ClassifierConfig, EmbedConfig, HeadsConfig, ModelConfig
from polytrain.models.convert.family import Architecture, Family
from polytrain.models.convert.rules import ConversionError, Rule, reshaped, same
from polytrain.tokens import EmbedSpec

NAME = re.compile(r"vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_(?P<img>\d+)(\.\w+)?")
"""A plain ViT's timm name, optionally with its pretrained tag (``vit_base_patch16_224.augreg_in21k``)."""
SIZES = {"tiny": dict(embed_dim=192, depth=12, num_heads=3), "small": dict(embed_dim=384, depth=12, num_heads=6),
         "base": dict(embed_dim=768, depth=12, num_heads=12), "large": dict(embed_dim=1024, depth=24, num_heads=16),
         "huge": dict(embed_dim=1280, depth=32, num_heads=16),
         "giant": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11)}
"""The widths of timm's ViT sizes."""
NAMED = {("tiny", 16, 224), ("tiny", 16, 384), ("small", 32, 224), ("small", 32, 384), ("small", 16, 224),
         ("small", 16, 384), ("small", 8, 224), ("base", 32, 224), ("base", 32, 384), ("base", 16, 224),
         ("base", 16, 384), ("base", 8, 224), ("large", 32, 224), ("large", 32, 384), ("large", 16, 224),
         ("large", 16, 384), ("large", 14, 224), ("huge", 14, 224), ("giant", 14, 224)}
"""(size, patch, image side) of the plain ViTs timm registers by name."""
SHAPE_ARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "in_chans", "num_classes")
PLAIN_ARGS = dict(qkv_bias=True, class_token=True, global_pool="token", no_embed_class=False, pre_norm=False,
                  fc_norm=None, reg_tokens=0, init_values=None, dynamic_img_size=False, qk_norm=False, final_norm=True,
                  pos_embed="learn")
"""Arguments polytrain follows only at these values (timm's defaults)."""
TRAINING_ARGS = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
"""Arguments of how timm trains, not of what it computes."""
FALLBACK_NAME = "vit_base_patch16_224"
"""The name export writes for a shape timm has no name for (``model_args`` then carry every width)."""


def model_args(config: dict) -> dict:
    """The arguments timm builds the checkpoint's model with: its name's, then ``config``'s."""
    name = config.get("architecture", "")
    match = NAME.fullmatch(name)
    if not match or match["size"] not in SIZES:
        raise ConversionError(f"timm model {name!r} is not a plain ViT polytrain can express; it takes "
                              f"vit_<size>_patch<p>_<img> with size one of {', '.join(SIZES)}")
    if config.get("global_pool", "token") != "token":
        raise ConversionError(f"timm global_pool={config['global_pool']!r}: polytrain pools the class token "
                              "(global_pool='token')")
    pretrained = config.get("pretrained_cfg", {})
    args = dict(mlp_ratio=4.0, **SIZES[match["size"]], patch_size=int(match["patch"]), img_size=int(match["img"]),
                in_chans=pretrained.get("input_size", (3,))[0],
                num_classes=config.get("num_classes", pretrained.get("num_classes", 1000)))
    given = config.get("model_args", {})
    for key, value in given.items():
        if key in PLAIN_ARGS and value != PLAIN_ARGS[key]:
            raise ConversionError(f"timm model arg {key}={value!r}: polytrain follows only {key}={PLAIN_ARGS[key]!r}")
        if key not in (*SHAPE_ARGS, *PLAIN_ARGS, *TRAINING_ARGS):
            raise ConversionError(f"timm model arg {key!r} is not one polytrain knows; known: "
                                  f"{', '.join((*SHAPE_ARGS, *PLAIN_ARGS, *TRAINING_ARGS))}")
    return {**args, **{key: value for key, value in given.items() if key in SHAPE_ARGS}}


def patch_side(arch: Architecture) -> int:
    """The patch side p of an image spec of ``arch.channels`` * p * p features."""
    side = round((arch.spec.input_dim / arch.channels) ** 0.5)
    if arch.channels * side * side != arch.spec.input_dim:
        raise ConversionError(f"image patches of {arch.spec.input_dim} features are not {arch.channels} channels of "
                              "a square patch; give the channels the image tokenizer reads")
    return side


class TimmViT(Family):
    name, modality, head = "timm", "image", "encoder_classifier"

    def architecture(self, config: dict) -> Architecture:
        args = model_args(config)
        dim, patch, channels = args["embed_dim"], args["patch_size"], args["in_chans"]
        height, width = (args["img_size"],) * 2 if isinstance(args["img_size"], int) else tuple(args["img_size"])
        if height % patch or width % patch:
            raise ConversionError(f"timm img_size={args['img_size']} is not a whole number of {patch}-pixel patches")
        if args["num_classes"] < 2:
            raise ConversionError(f"timm num_classes={args['num_classes']}: polytrain's classifier needs >= 2 classes")
        backbone = BackboneConfig(dim=dim, n_heads=args["num_heads"], encoder_layers=args["depth"], decoder_layers=0,
                                  mlp_width=int(dim * args["mlp_ratio"]), norm_eps=1e-6)  # timm's int() of the ratio
        model = ModelConfig(backbone=backbone,
                            embed=EmbedConfig(modality_vector=False, patch_positions="raster", cls_token=True),
                            heads=HeadsConfig(classifier=ClassifierConfig(classes=args["num_classes"], pooling="cls")))
        spec = EmbedSpec("image", channels * patch * patch, (height // patch, width // patch))
        return Architecture(model, spec, self.head, channels)

    def library_config(self, arch: Architecture) -> dict:
        """timm's ``config.json``, which ``timm.create_model("local-dir:FOLDER", pretrained=True)`` reads."""
        b, (rows, cols), side = arch.model.backbone, arch.spec.grid, patch_side(arch)
        classes = arch.model.heads.classifier.classes
        image = rows * side if rows == cols else [rows * side, cols * side]
        args = dict(embed_dim=b.dim, depth=b.encoder_layers, num_heads=b.n_heads, mlp_ratio=b.mlp_hidden / b.dim,
                    patch_size=side, img_size=image, in_chans=arch.channels, num_classes=classes)
        size = next((size for size, widths in SIZES.items()
                     if all(args[k] == v for k, v in {"mlp_ratio": 4.0, **widths}.items())), None)
        name = f"vit_{size}_patch{side}_{image}" if (size, side, image) in NAMED else FALLBACK_NAME
        return {"architecture": name, "num_classes": classes, "global_pool": "token", "model_args": args,
                "pretrained_cfg": {"input_size": [arch.channels, rows * side, cols * side], "num_classes": classes}}

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        side = patch_side(arch)

        def conv_shape(w_EK: Tensor) -> tuple[int, ...]:
            return w_EK.shape[0], arch.channels, side, side

        rules = [
            reshaped("embedders.image.cls", "cls_token", lambda t: t.shape[-1:], lambda t: (1, 1, t.shape[0])),
            reshaped("embedders.image.position.table.weight", "pos_embed", lambda t: t.shape[-2:],
                     lambda t: (1, *t.shape)),
            reshaped("embedders.image.proj.weight", "patch_embed.proj.weight", lambda t: (t.shape[0], -1), conv_shape),
            same("embedders.image.proj.bias", "patch_embed.proj.bias"),
            same("backbone.encoder.norm.weight", "norm.weight"),
            same("backbone.encoder.norm.bias", "norm.bias"),
            same(f"heads.{task}.proj.weight", "head.weight"),
            same(f"heads.{task}.proj.bias", "head.bias"),
        ]
        names = {"attn_norm": "norm1", "attn.qkv": "attn.qkv", "attn.out": "attn.proj", "mlp_norm": "norm2",
                 "mlp.fc": "mlp.fc1", "mlp.proj": "mlp.fc2"}
        for i in range(arch.model.backbone.encoder_layers):
            for ours, theirs in names.items():
                for kind in ("weight", "bias"):
                    rules.append(same(f"backbone.encoder.blocks.{i}.{ours}.{kind}", f"blocks.{i}.{theirs}.{kind}"))
        return rules


TIMM_VIT = TimmViT()
