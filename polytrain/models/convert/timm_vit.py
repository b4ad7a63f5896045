"""timm's ``VisionTransformer``: the plain ViT <-> polytrain encoder classifier; CLIP, SigLIP, DINOv2 -> image towers.

The architecture comes from timm's own description of a checkpoint, its
``config.json``: the model name (``architecture``), the arguments it was
created with (``model_args``, which override the name's), ``num_classes`` and
``pretrained_cfg`` (input size, mean and std, interpolation, crop).  The name
says the kind:

- ``vit_<size>_patch<p>_<img>``, the plain ViT: a class token with raster
  positions that include it, pre-norm blocks (LayerNorm eps 1e-6), the final
  norm and a linear head on the class token, read as polytrain's encoder
  classifier (patch embedder, encoder stack, head), and written back so.  A run
  that takes its image embedder as a tower reads it as one (``tower_architecture``).
- ``vit_<size>_patch<p>_clip[_quickgelu]_<img>``: CLIP's tower, a norm before the
  blocks (``norm_pre``), no patch bias, eps 1e-5, QuickGELU for the OpenAI weights.
- ``vit_<size>_patch<p>_siglip[_gap]_<img>``: SigLIP's, no class token; its
  attention-pool head is not a feature a tower reads (dropped).
- ``vit_<size>_patch14[_reg<n>]_dinov2``: DINOv2's, LayerScale, register tokens
  without positions (``no_embed_class``), 518-pixel positions by default.

These are image towers of no head (timm's own head, pooling and ``fc_norm``
are not read).  The patch convolution's (E, C, p, p) weight is polytrain's
(E, C*p*p) linear map over patches in (channel, row, col) order.

Shape legend: E model dim, C channels, p patch side, N patches.
"""

import re

from polytrain.config.model import BackboneConfig, ClassifierConfig, EmbedConfig, HeadsConfig, ModelConfig
from polytrain.config.tower import TowerConfig
from polytrain.models.convert.family import Architecture, Family, tower_unread
from polytrain.models.convert.rules import ConversionError, Rule, reshaped, same
from polytrain.tokens import EmbedSpec

NAME = re.compile(r"vit_(?P<size>[a-z0-9]+)_patch(?P<patch>\d+)"
                  r"(?P<kind>_clip_quickgelu|_clip|_siglip_gap|_siglip|_reg(?P<reg>\d+)_dinov2|_dinov2)?"
                  r"(_(?P<img>\d+))?(\.[\w-]+)?")
"""A timm ViT's name, optionally with its pretrained tag (``vit_base_patch16_224.augreg_in21k``)."""
SIZES = {"tiny": dict(embed_dim=192, depth=12, num_heads=3), "small": dict(embed_dim=384, depth=12, num_heads=6),
         "base": dict(embed_dim=768, depth=12, num_heads=12), "large": dict(embed_dim=1024, depth=24, num_heads=16),
         "huge": dict(embed_dim=1280, depth=32, num_heads=16),
         "giant": dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11),
         "gigantic": dict(embed_dim=1664, depth=48, num_heads=16, mlp_ratio=64 / 13),
         "so400m": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362)}
"""The widths of timm's ViT sizes."""
KINDS = {"": {}, "_clip": dict(pre_norm=True, norm_eps=1e-5),
         "_clip_quickgelu": dict(pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu"),
         "_siglip": dict(class_token=False, global_pool="map"),
         "_siglip_gap": dict(class_token=False, global_pool="avg", fc_norm=False),
         "_dinov2": dict(init_values=1e-5, img_size=518)}
"""What each kind's named models set (``norm_eps``: the eps of their ``norm_layer``, which a config cannot carry)."""
PREPROCESSING = {"_clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                 "_dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}
"""Mean and std of each kind's pretrained weights where ``pretrained_cfg`` does not say (timm's default: 0.5)."""
NAMED = {("tiny", 16, 224), ("tiny", 16, 384), ("small", 32, 224), ("small", 32, 384), ("small", 16, 224),
         ("small", 16, 384), ("small", 8, 224), ("base", 32, 224), ("base", 32, 384), ("base", 16, 224),
         ("base", 16, 384), ("base", 8, 224), ("large", 32, 224), ("large", 32, 384), ("large", 16, 224),
         ("large", 16, 384), ("large", 14, 224), ("huge", 14, 224), ("giant", 14, 224)}
"""(size, patch, image side) of the plain ViTs timm registers by name."""
SHAPE_ARGS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "in_chans", "num_classes")
PLAIN_ARGS = dict(qkv_bias=True, class_token=True, global_pool="token", no_embed_class=False, pre_norm=False,
                  fc_norm=None, reg_tokens=0, init_values=None, dynamic_img_size=False, qk_norm=False, final_norm=True,
                  pos_embed="learn", act_layer=None, proj_bias=True)
"""Arguments the classifier reading follows only at these values (timm's defaults)."""
TOWER_ARGS = dict(qkv_bias=(True, False), proj_bias=(True, False), class_token=(True, False),
                  no_embed_class=(True, False), pre_norm=(True, False), reg_tokens=None, init_values=None,
                  final_norm=(True, False), act_layer=(None, "gelu", "quick_gelu"), pos_embed=("learn",),
                  qk_norm=(False,), global_pool=None, fc_norm=None, dynamic_img_size=(True, False))
"""Arguments a tower reads (None: any value; the head's pooling and norm are not read)."""
TRAINING_ARGS = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
"""Arguments of how timm trains, not of what it computes."""
FALLBACK_NAME = "vit_base_patch16_224"
"""The name export writes for a shape timm has no name for (``model_args`` then carry every width)."""


def timm_args(config: dict) -> tuple[str, dict]:
    """(the kind, the arguments timm builds the checkpoint's model with: its name's, then ``config``'s)."""
    name = config.get("architecture", "")
    match = NAME.fullmatch(name)
    if not match or match["size"] not in SIZES or (match["img"] is None and "dinov2" not in (match["kind"] or "")):
        raise ConversionError(f"timm model {name!r} is not a ViT polytrain can express; it takes "
                              f"vit_<size>_patch<p>[_clip|_clip_quickgelu|_siglip]_<img> and "
                              f"vit_<size>_patch<p>[_reg<n>]_dinov2, size one of {', '.join(SIZES)}")
    kind = "_dinov2" if match["reg"] else match["kind"] or ""
    if kind == "_dinov2" and match["size"] == "giant":
        raise ConversionError(f"timm model {name!r}: DINOv2's giant has a SwiGLU MLP of its own layout, which "
                              "polytrain does not read")
    pretrained = config.get("pretrained_cfg", {})
    args = dict(mlp_ratio=4.0, patch_size=int(match["patch"]), img_size=224,
                in_chans=pretrained.get("input_size", (3,))[0],
                num_classes=config.get("num_classes", pretrained.get("num_classes", 1000)))
    args.update(**SIZES[match["size"]], **KINDS[kind])
    if match["img"]:
        args["img_size"] = int(match["img"])
    elif "input_size" in pretrained:
        args["img_size"] = pretrained["input_size"][1]
    if match["reg"]:
        args.update(reg_tokens=int(match["reg"]), no_embed_class=True)
    return kind, {**args, **config.get("model_args", {})}


def check_args(given: dict, allowed: dict, reading: str) -> None:
    for key, value in given.items():
        if key in SHAPE_ARGS or key in TRAINING_ARGS:
            continue
        if key not in allowed:
            raise ConversionError(f"timm model arg {key!r} is not one polytrain knows; known: "
                                  f"{', '.join((*SHAPE_ARGS, *allowed, *TRAINING_ARGS))}")
        values = allowed[key] if isinstance(allowed[key], tuple) or allowed[key] is None else (allowed[key],)
        if values is not None and value not in values:
            raise ConversionError(f"timm model arg {key}={value!r}: polytrain's {reading} follows only "
                                  f"{key}={' or '.join(map(repr, values))}")


def triple(values) -> list[float]:
    """Per-channel statistics as the image tokenizer takes them: three (a grayscale model's one, repeated)."""
    values = [float(v) for v in values]
    return values * 3 if len(values) == 1 else values


def image_grid(args: dict) -> tuple[int, int]:
    height, width = (args["img_size"],) * 2 if isinstance(args["img_size"], int) else tuple(args["img_size"])
    patch = args["patch_size"]
    if height % patch or width % patch:
        raise ConversionError(f"timm img_size={args['img_size']} is not a whole number of {patch}-pixel patches")
    return height // patch, width // patch


def patch_side(arch: Architecture) -> int:
    """The patch side p of an image spec of ``arch.channels`` * p * p features."""
    spec = arch.spec if arch.spec.modality == "image" else next(s for s in arch.others if s.modality == "image")
    side = round((spec.input_dim / arch.channels) ** 0.5)
    if arch.channels * side * side != spec.input_dim:
        raise ConversionError(f"image patches of {spec.input_dim} features are not {arch.channels} channels of "
                              "a square patch; give the channels the image tokenizer reads")
    return side


def tower_architecture(tower: TowerConfig, spec: EmbedSpec, channels: int) -> Architecture:
    """A model of one image tower and no head: what an encoder-only checkpoint is."""
    backbone = BackboneConfig(dim=tower.dim, n_heads=tower.n_heads, encoder_layers=0, decoder_layers=0)
    model = ModelConfig(backbone=backbone, embed=EmbedConfig(modality_vector=False), towers={"image": tower})
    return Architecture(model, spec, "", channels)


class TimmViT(Family):
    name, modality, head = "timm", "image", "encoder_classifier"

    def architecture(self, config: dict) -> Architecture:
        """The plain ViT's encoder classifier; a CLIP, SigLIP or DINOv2 ViT, or a plain one with settings only a
        tower follows (registers, LayerScale), as a tower."""
        kind, args = timm_args(config)
        if kind:
            return self.tower_architecture(config)
        try:
            return self.classifier(config, args)
        except ConversionError as err:
            try:
                return self.tower_architecture(config)
            except ConversionError:
                raise err from None

    def classifier(self, config: dict, args: dict) -> Architecture:
        check_args(config.get("model_args", {}), PLAIN_ARGS, "classifier")
        if config.get("global_pool", "token") != "token":
            raise ConversionError(f"timm global_pool={config['global_pool']!r}: polytrain pools the class token "
                                  "(global_pool='token')")
        dim, patch, channels = args["embed_dim"], args["patch_size"], args["in_chans"]
        rows, cols = image_grid(args)
        if args["num_classes"] < 2:
            raise ConversionError(f"timm num_classes={args['num_classes']}: polytrain's classifier needs >= 2 classes")
        backbone = BackboneConfig(dim=dim, n_heads=args["num_heads"], encoder_layers=args["depth"], decoder_layers=0,
                                  mlp_width=int(dim * args["mlp_ratio"]), norm_eps=1e-6)  # timm's int() of the ratio
        model = ModelConfig(backbone=backbone,
                            embed=EmbedConfig(modality_vector=False, patch_positions="raster", cls_token=True),
                            heads=HeadsConfig(classifier=ClassifierConfig(classes=args["num_classes"], pooling="cls")))
        spec = EmbedSpec("image", channels * patch * patch, (rows, cols))
        return Architecture(model, spec, self.head, channels)

    def tower_architecture(self, config: dict) -> Architecture:
        kind, args = timm_args(config)
        check_args(config.get("model_args", {}), TOWER_ARGS, "tower")
        if args.get("qkv_bias", True) != args.get("proj_bias", True):
            raise ConversionError("timm qkv_bias and proj_bias differ: a polytrain tower has biases on all of its "
                                  "projections or on none")
        rows, cols = image_grid(args)
        if rows != cols:
            raise ConversionError(f"timm img_size={args['img_size']}: a tower's position grid is square")
        dim, patch, channels = args["embed_dim"], args["patch_size"], args["in_chans"]
        tower = TowerConfig(dim=dim, layers=args["depth"], n_heads=args["num_heads"],
                            mlp_width=int(dim * args["mlp_ratio"]), mlp=args.get("act_layer") or "gelu",
                            norm_eps=args.get("norm_eps", 1e-6), bias=args.get("qkv_bias", True),
                            patch_bias=not args.get("pre_norm", False), input_norm=args.get("pre_norm", False),
                            layer_scale=args.get("init_values") is not None, cls_token=args.get("class_token", True),
                            registers=args.get("reg_tokens", 0), prefix_positions=not args.get("no_embed_class", False),
                            positions=rows, final_norm=args.get("final_norm", True), projector="none")
        return tower_architecture(tower, EmbedSpec("image", channels * patch * patch, (rows, cols)), channels)

    def preprocessing(self, config: dict, preprocessor: dict) -> dict:
        kind, args = timm_args(config)
        pretrained = config.get("pretrained_cfg", {})
        image = {"size": args["img_size"] if isinstance(args["img_size"], int) else args["img_size"][0],
                 "patch_size": args["patch_size"], "channels": args["in_chans"]}
        mean, std = (pretrained.get("mean"), pretrained.get("std")) if "mean" in pretrained else \
            PREPROCESSING.get(kind, (None, None))
        if mean is not None:
            image.update(mean=triple(mean), std=triple(std))
        if kind or "interpolation" in pretrained or "crop_pct" in pretrained:  # timm's eval transform
            image.update(resize="crop", crop_pct=float(pretrained.get("crop_pct", 1.0)),
                         interpolation="bicubic" if pretrained.get("interpolation", "bicubic") == "bicubic"
                         else "bilinear")
        return {"image": image}

    def library_config(self, arch: Architecture) -> dict:
        """timm's ``config.json``, which ``timm.create_model("local-dir:FOLDER", pretrained=True)`` reads."""
        if arch.model.towers:
            raise ConversionError("timm's VisionTransformer is written from an encoder classifier, not a tower")
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

    def unread(self, arch: Architecture) -> str:
        if not arch.model.towers:
            return ""
        return "|".join([r"^(head|fc_norm|attn_pool|head_drop)\.",
                         *tower_unread(arch.model.towers["image"], r"blocks\.", "norm")])

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        if arch.model.towers:
            return self.tower_rules(arch)
        rules = [
            reshaped("embedders.image.cls", "cls_token", lambda t: t.shape[-1:], lambda t: (1, 1, t.shape[0])),
            reshaped("embedders.image.position.table.weight", "pos_embed", lambda t: t.shape[-2:],
                     lambda t: (1, *t.shape)),
            self.patch_rule(arch, "embedders.image.proj.weight"),
            same("embedders.image.proj.bias", "patch_embed.proj.bias"),
            same("backbone.encoder.norm.weight", "norm.weight"),
            same("backbone.encoder.norm.bias", "norm.bias"),
            same(f"heads.{task}.proj.weight", "head.weight"),
            same(f"heads.{task}.proj.bias", "head.bias"),
        ]
        return rules + self.block_rules("backbone.encoder", arch.model.backbone.encoder_layers, True, False)

    def tower_rules(self, arch: Architecture) -> list[Rule]:
        tower, ours = arch.model.towers["image"], "embedders.image.tower"
        rules = [self.patch_rule(arch, f"{ours}.stem.proj.weight"),
                 reshaped(f"{ours}.stem.position.table", "pos_embed", lambda t: t.shape[-2:], lambda t: (1, *t.shape))]
        if tower.patch_bias:
            rules.append(same(f"{ours}.stem.proj.bias", "patch_embed.proj.bias"))
        if tower.cls_token:
            rules.append(reshaped(f"{ours}.stem.cls", "cls_token", lambda t: t.shape[-2:], lambda t: (1, *t.shape)))
        if tower.registers:
            rules.append(reshaped(f"{ours}.stem.registers", "reg_token", lambda t: t.shape[-2:],
                                  lambda t: (1, *t.shape)))
        norms = [("input_norm", "norm_pre")] * tower.input_norm + [("norm", "norm")] * tower.final_norm
        rules += [same(f"{ours}.{o}.{kind}", f"{t}.{kind}") for o, t in norms for kind in ("weight", "bias")]
        return rules + self.block_rules(ours, tower.built_layers, tower.bias, tower.layer_scale)

    @staticmethod
    def patch_rule(arch: Architecture, ours: str) -> Rule:
        side = patch_side(arch)
        return reshaped(ours, "patch_embed.proj.weight", lambda t: (t.shape[0], -1),
                        lambda w_EK: (w_EK.shape[0], arch.channels, side, side))

    @staticmethod
    def block_rules(ours: str, layers: int, bias: bool, layer_scale: bool) -> list[Rule]:
        names = {"attn_norm": "norm1", "attn.qkv": "attn.qkv", "attn.out": "attn.proj", "mlp_norm": "norm2",
                 "mlp.fc": "mlp.fc1", "mlp.proj": "mlp.fc2"}
        rules = []
        for i in range(layers):
            for o, t in names.items():
                for kind in ("weight", "bias") if bias or "norm" in o else ("weight",):
                    rules.append(same(f"{ours}.blocks.{i}.{o}.{kind}", f"blocks.{i}.{t}.{kind}"))
            if layer_scale:
                rules += [same(f"{ours}.blocks.{i}.attn_scale.gamma", f"blocks.{i}.ls1.gamma"),
                          same(f"{ours}.blocks.{i}.mlp_scale.gamma", f"blocks.{i}.ls2.gamma")]
        return rules


TIMM_VIT = TimmViT()
