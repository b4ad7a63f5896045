"""Hugging Face ``LlavaForConditionalGeneration`` <-> polytrain decoder-only with an image tower.

LLaVA is a CLIP or SigLIP vision model (``hf_clip``), a projector
(``multi_modal_projector``: ``linear_1``, GELU, ``linear_2``, LLaVA-1.5's
``mlp2x_gelu``) and a Llama, Qwen2 or Mistral LM (``hf_llama``).  The vision
model's ``hidden_states[vision_feature_layer]`` (never through its final norm)
feed the projector; ``vision_feature_select_strategy`` ``default`` drops the
class token, ``full`` keeps every vector.  The LM reads ``input_ids`` holding
one ``image_token_index`` per image feature, no other marker: a polytrain run
lays its image spans out so with ``tokenizers.text.span_markers: false``, and
``<image>`` is the image token.  The LM attends causally over image tokens as
over text (``data.tasks.<task>.span_attention: causal``).

Tensors are read in the hub's layout (``language_model.model.``,
``language_model.lm_head``, ``vision_tower.vision_model.``,
``multi_modal_projector.``, as ``transformers`` saves them) and in the layout of
``transformers`` 5's modules (``model.language_model.``, ``model.vision_tower.``,
``lm_head``), and written in the hub's.  The tower is exported as built: its
blocks up to the selected layer, so ``vision_feature_layer`` is written -1;
CLIP's post-norm, which LLaVA never reads, as an identity.
"""

import re
from dataclasses import replace

from torch import Tensor

from polytrain.config.registries import FAMILIES
from polytrain.config.tokenizers import markers
from polytrain.models.convert.family import Architecture, HFFamily
from polytrain.models.convert.hf_clip import (
    DEFAULTS,
    VISION_MODEL_TYPES,
    identity_norm,
    image_preprocessing,
    image_spec,
    tower_of,
    vision_rules,
    vision_settings,
    vision_unread,
)
from polytrain.models.convert.hf_llama import LlamaLike
from polytrain.models.convert.rules import ConversionError, NoPlace, Rule, same

VISION = "vision_tower.vision_model."
LANGUAGE = "language_model."
PROJECTOR = "multi_modal_projector."
LAYOUTS = ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
           (r"^model\.vision_tower\.", "vision_tower."), (r"^model\.multi_modal_projector\.", PROJECTOR),
           (r"^vision_tower\.(?!vision_model\.)", VISION))
"""transformers 5's module names -> the hub's, applied in order."""
VISION_DEFAULTS = dict(model_type="clip_vision_model", intermediate_size=4096, hidden_size=1024, patch_size=14,
                       image_size=336, num_hidden_layers=24, num_attention_heads=16)
"""``LlavaConfig``'s default vision config (LLaVA-1.5's CLIP ViT-L/14 at 336 pixels), for files that leave it out."""
IMAGE_TOKEN = markers("image")[0]
"""The image token LLaVA's tokenizers name ``<image>``, polytrain's image span slot token."""


class Llava(HFFamily):
    name, model_type, head = "LlavaForConditionalGeneration", "llava", "decoder_only"
    unused, span_slots = LlamaLike.unused, True

    def parts(self, config: dict) -> tuple[LlamaLike, dict, str, dict]:
        """(the LM's family, its config, the vision kind, the vision config)."""
        text = config.get("text_config") or {}
        lm = FAMILIES.get(text.get("model_type", "llama")) if text.get("model_type", "llama") in FAMILIES else None
        if not isinstance(lm, LlamaLike):
            raise ConversionError(f"{self.name} text_config model_type={text.get('model_type')!r}: polytrain reads "
                                  "LLaVA with a llama, qwen2 or mistral LM")
        vision = config.get("vision_config") or VISION_DEFAULTS
        kind = VISION_MODEL_TYPES.get(vision.get("model_type", "clip_vision_model"))
        if kind is None:
            raise ConversionError(f"{self.name} vision_config model_type={vision.get('model_type')!r}: polytrain "
                                  f"reads {', '.join(VISION_MODEL_TYPES)}")
        return lm, text, kind, vision

    def architecture(self, config: dict) -> Architecture:
        lm, text, kind, vision = self.parts(config)
        language = lm.architecture(text)
        layer = config.get("vision_feature_layer", -2)
        strategy = config.get("vision_feature_select_strategy", "default")
        if not isinstance(layer, int):
            raise ConversionError(f"{self.name} config vision_feature_layer={layer!r}: polytrain's tower reads one "
                                  "layer")
        if config.get("projector_hidden_act", "gelu") != "gelu":
            raise ConversionError(f"{self.name} config projector_hidden_act={config['projector_hidden_act']!r}: "
                                  "polytrain's mlp2x_gelu projector has GELU")
        tower = tower_of(vision, kind, self.name)
        if strategy == "default" and not tower.cls_token:
            raise ConversionError(f"{self.name} config vision_feature_select_strategy='default' drops the first of "
                                  f"{kind}'s patches, which has no class token; polytrain keeps every patch ('full')")
        tower = replace(tower, feature_layer=layer, final_norm=False, keep_cls=strategy == "full" and tower.cls_token,
                        projector="mlp2x_gelu", projector_bias=config.get("multimodal_projector_bias", True))
        tower.check()
        tie = config.get("tie_word_embeddings") or language.model.tie_embeddings
        model = replace(language.model, towers={"image": tower}, tie_embeddings=tie)
        channels = {**DEFAULTS[kind], **vision}["num_channels"]
        return Architecture(model, language.spec, self.head, channels, (image_spec(vision, kind),))

    @staticmethod
    def language(arch: Architecture) -> Architecture:
        """The LM alone."""
        return replace(arch, model=replace(arch.model, towers={}), others=())

    def kind(self, arch: Architecture) -> str:
        """The vision model of the model's image tower; a model without one is not of LLaVA's shape."""
        tower = arch.model.towers.get("image")
        if tower is None or not any(s.modality == "image" for s in arch.others) or tower.stem != "patch":
            raise NoPlace(f"{self.name} has no place for the model's image embedder: it reads an image tower "
                          "(model.towers.image) with a patch stem")
        return "clip" if tower.cls_token and tower.input_norm else "siglip"

    def settings(self, arch: Architecture) -> dict:
        kind, tower = self.kind(arch), arch.model.towers["image"]
        lm = FAMILIES.get("qwen2" if arch.model.backbone.biases == (True, False, False) else "llama")
        text = {"model_type": lm.model_type, **lm.settings(self.language(arch))}
        side = (tower.positions or arch.others[0].grid[0])
        strategy = "default" if tower.cls_token and not tower.keep_cls else "full"
        return dict(vision_config=vision_settings(tower, arch.others[0], arch.channels, kind, self.name),
                    text_config=text, projector_hidden_act="gelu", vision_feature_layer=-1,
                    vision_feature_select_strategy=strategy, multimodal_projector_bias=tower.projector_bias,
                    image_seq_length=side * side, tie_word_embeddings=arch.model.tie_embeddings)

    def token_ids(self, config: dict, ids: dict[str, int]) -> dict:
        config = super().token_ids(config, ids)
        if "image" not in ids:
            raise ConversionError(f"{self.name} needs the tokenizer's image token {IMAGE_TOKEN}; the run's has none")
        return {**config, "image_token_index": ids["image"],
                "text_config": {**config["text_config"], **{k: config[k] for k in config if k.endswith("_token_id")}}}

    def preprocessing(self, config: dict, preprocessor: dict) -> dict:
        _, _, kind, vision = self.parts(config)
        return {"image": image_preprocessing(vision, preprocessor, kind)}

    def prepare(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        renamed = {}
        for name, t in state.items():
            for pattern, hub in LAYOUTS:
                name = re.sub(pattern, hub, name)
            renamed[name] = t
        return super().prepare(renamed)

    def unread(self, arch: Architecture) -> str:
        self.kind(arch)
        return vision_unread(arch.model.towers["image"], VISION)

    def placeholders(self, arch: Architecture) -> dict[str, Tensor]:
        return identity_norm(arch.model.towers["image"], VISION)

    def rules(self, arch: Architecture, task: str) -> list[Rule]:
        self.kind(arch)
        lm = FAMILIES.get("llama")
        rules = [Rule(r.ours, tuple(LANGUAGE + n for n in r.theirs), r.to_ours, r.to_theirs,
                      tuple(LANGUAGE + n for n in r.restored)) for r in lm.rules(self.language(arch), task)]
        rules += vision_rules(arch, VISION)
        tower = arch.model.towers["image"]
        kinds = ("weight", "bias") if tower.projector_bias else ("weight",)
        rules += [same(f"embedders.image.projector.{o}.{k}", f"{PROJECTOR}{t}.{k}")
                  for o, t in (("fc", "linear_1"), ("proj", "linear_2")) for k in kinds]
        return rules


LLAVA = Llava()
