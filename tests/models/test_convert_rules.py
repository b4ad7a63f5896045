"""Every family against its library's own default config, and the errors of tensors and configs that do not fit."""

import pytest
import torch

from polytrain.config.model import BackboneConfig, ClassifierConfig, EmbedConfig, HeadsConfig, ModelConfig
from polytrain.config.registries import FAMILIES
from polytrain.models.convert.external import export_weights, import_weights, load_state, write_external
from polytrain.models.convert.rules import ConversionError
from polytrain.models.model import PolyModel
from polytrain.tokens import EmbedSpec

transformers = pytest.importorskip("transformers")

LIBRARY_CLASSES = ["GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "BertForMaskedLM",
                   "BertForSequenceClassification", "BartForConditionalGeneration", "WhisperForConditionalGeneration",
                   "LlavaForConditionalGeneration"]
TOWER_CLASSES = ["CLIPVisionModel", "CLIPModel", "SiglipVisionModel", "SiglipModel"]
"""Encoders read as towers alone (written only inside LLaVA)."""
DEFAULTS = {"LlavaForConditionalGeneration": dict(vision_feature_layer=-1)}
"""Library defaults a polytrain model writes differently: LLaVA's tower is written as built, up to its feature
layer (the default -2 reads 23 of CLIP's 24 layers)."""


def test_every_hugging_face_family_is_tested_here():
    hf = {name for name in FAMILIES.names() if FAMILIES.get(name).name == name and name != "timm"}
    assert hf == set(LIBRARY_CLASSES) | set(TOWER_CLASSES)


@pytest.mark.parametrize("name", TOWER_CLASSES)
def test_a_default_encoders_tensors_are_all_read_or_named_as_unread(name):
    """The library's default model (CLIP ViT-B/32, SigLIP B/16) on the meta device fills every tensor of its
    tower; what it has beyond (the text side, heads, CLIP's pooled post-norm) is dropped by name."""
    library_class, family = getattr(transformers, name), FAMILIES.get(name)
    arch = family.architecture({"architectures": [name]})
    with torch.device("meta"):
        theirs = library_class(library_class.config_class()).state_dict()
        ours = arch.build("task")
    import_weights(ours, family, arch, "task", theirs)


@pytest.mark.parametrize("name", LIBRARY_CLASSES)
def test_the_default_config_gives_the_librarys_tensor_names_and_shapes(name):
    """A config.json of only the class name means the library's defaults (a 7B Llama, a BERT-base): built on the
    meta device, the polytrain export has exactly the library model's tensors, names and shapes."""
    library_class = getattr(transformers, name)
    family = FAMILIES.get(name)
    arch = family.architecture({"architectures": [name], **DEFAULTS.get(name, {})})
    with torch.device("meta"):
        theirs = family.prepare(library_class(library_class.config_class(**DEFAULTS.get(name, {}))).state_dict())
        ours = arch.build("task")
    _, state = export_weights(ours, family, "task", restored=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def gpt2_state():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(config).state_dict()


def gpt2_like(**backbone) -> PolyModel:
    b = BackboneConfig(**{**dict(dim=64, n_heads=4, encoder_layers=0, decoder_layers=2, mlp="gelu_tanh"), **backbone})
    return PolyModel(ModelConfig(backbone=b, embed=EmbedConfig(modality_vector=False)),
                     [EmbedSpec("text", 100, (1, 32))], {"lm": "decoder_only"})


def test_a_missing_extra_or_untied_tensor_is_named():
    state, model = gpt2_state(), gpt2_like()
    with pytest.raises(ConversionError, match=r"no 'transformer\.h\.1\.ln_2\.bias' \(polytrain "
                                              r"'backbone\.decoder\.blocks\.1\.mlp_norm\.bias' \(64,\) needs it\)"):
        load_state(model, "lm", "GPT2LMHeadModel", {k: v for k, v in state.items() if k != "transformer.h.1.ln_2.bias"})
    with pytest.raises(ConversionError, match=r"no place for: \['extra'\]"):
        load_state(model, "lm", "GPT2LMHeadModel", {**state, "extra": torch.zeros(1)})
    with pytest.raises(ConversionError, match="lm_head.weight differs from transformer.wte.weight"):
        load_state(model, "lm", "GPT2LMHeadModel", {**state, "lm_head.weight": state["lm_head.weight"] + 1})
    wide = {**state, "transformer.h.0.attn.c_attn.weight": torch.zeros(64, 96)}
    with pytest.raises(ConversionError, match=r"transformer\.h\.0\.attn\.c_attn\.weight \(64, 96\) gives \(96, 64\) "
                                              r"for polytrain 'backbone\.decoder\.blocks\.0\.attn\.qkv\.weight', "
                                              r"which is \(192, 64\)"):
        load_state(model, "lm", "GPT2LMHeadModel", wide)


def test_parts_that_do_not_stack_are_named_with_their_shapes():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                                      num_attention_heads=4, max_position_embeddings=32)
    state = transformers.LlamaForCausalLM(config).state_dict()
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 48)
    arch = FAMILIES.get("LlamaForCausalLM").architecture(config.to_dict())
    with pytest.raises(ConversionError, match=r"q_proj\.weight \(64, 64\), .*k_proj\.weight \(16, 48\), .*cannot "
                                              r"make polytrain 'backbone\.decoder\.blocks\.0\.attn\.qkv\.weight' "
                                              r"\(192, 64\)"):
        load_state(arch.build("lm"), "lm", "LlamaForCausalLM", state)


@pytest.mark.parametrize("family, backbone, message", [
    ("GPT2LMHeadModel", dict(norm="rmsnorm"), "model.backbone.norm='rmsnorm' .*gives back 'layernorm'"),
    ("GPT2LMHeadModel", dict(bias=False), "model.backbone.qkv_bias=False"),
    ("GPT2LMHeadModel", dict(mlp="swiglu"), "model.backbone.mlp='swiglu'; it takes gelu, gelu_tanh, quick_gelu, relu"),
    ("LlamaForCausalLM", dict(), r"embedders.text.position.weight \(6 tensors .* no place in it: backbone.decoder, "
                                 "embedders.text\)"),
    ("Qwen2ForCausalLM", dict(mlp="swiglu", norm="rmsnorm", position="rope", bias=False),
     "model.backbone.qkv_bias=False .*gives back True"),
    ("BartForConditionalGeneration", dict(norm_position="post"), "model.backbone.embed_norm=False .*gives back True"),
])
def test_export_names_what_the_library_cannot_express(family, backbone, message, tmp_path):
    with pytest.raises(ConversionError, match=f"{family} cannot express {message}"):
        write_external(gpt2_like(**backbone), "lm", family, tmp_path)
    assert not tmp_path.joinpath("config.json").exists()


def test_export_of_a_multimodal_model_names_the_modality_vector(tmp_path):
    b = BackboneConfig(dim=64, n_heads=4, encoder_layers=2, decoder_layers=0, norm_eps=1e-6)
    model = PolyModel(ModelConfig(backbone=b, heads=HeadsConfig(classifier=ClassifierConfig(classes=3))),
                      [EmbedSpec("image", 3 * 8 * 8, (4, 4)), EmbedSpec("text", 100, (1, 8))],
                      {"classify": "encoder_classifier"})
    with pytest.raises(ConversionError, match=r"timm cannot express embedders.image.modality \(6 tensors"):
        write_external(model, "classify", "timm", tmp_path)
    with pytest.raises(ConversionError, match="the model has no task 'lm'; its tasks: classify"):
        write_external(model, "lm", "timm", tmp_path)
