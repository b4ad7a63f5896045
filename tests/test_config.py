import pytest
import yaml

from polytrain.config import Config, apply_override, load_config
from polytrain.errors import ConfigError
from polytrain.schema import from_dict, to_dict
from tests.helpers import QUICKSTART


def test_quickstart_loads_with_overrides():
    cfg = load_config(QUICKSTART, ["train.steps=50", "train.lr=3e-4", "data.tasks.text_lm.batch_size=2",
                                   "tracking.wandb.tags=[a, b]", "train.run_name=demo"])
    assert cfg.train.steps == 50
    assert cfg.train.lr == pytest.approx(3e-4)  # "3e-4" is a YAML string; float fields take it
    assert cfg.data.tasks["text_lm"].batch_size == 2
    assert cfg.tracking.wandb.tags == ["a", "b"]
    assert cfg.train.run_name == "demo"
    assert cfg.data.tasks["image_to_text"].source == "image"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(QUICKSTART, ["model.backbone.dim=96", "model.backbone.n_heads=4"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    assert load_config(path) == cfg


def test_defaults_fill_missing_sections():
    cfg = from_dict(Config, {"data": {"tasks": {"lm": {"head": "decoder_only", "train": "a", "val": "b"}}}})
    assert cfg.engine.zero_stage == 2 and cfg.model.backbone.dim == 256


@pytest.mark.parametrize("override, key, fragment", [
    ("model.backbone.dimm=200", "model.backbone.dimm", "did you mean 'model.backbone.dim'"),
    ("train.steps=ten", "train.steps", "must be an integer"),
    ("train.steps=1.5", "train.steps", "must be an integer"),
    ("model.backbone.n_heads=7", "model.backbone.n_heads", "divide dim=192"),
    ("engine.zero_stage=4", "engine.zero_stage", "must be 0, 1, 2 or 3"),
    ("engine.precision=fp8", "engine.precision", "one of 'fp32', 'bf16'"),
    ("data.tasks.image_to_text.head=vit", "data.tasks.image_to_text.head", "known: decoder_only, encoder_classifier, encoder_decoder, masked_lm"),
    ("data.tasks.audio_to_text.source=vidoe", "data.tasks.audio_to_text.source", "known: audio, image, text"),
    ("data.tasks.text_lm.seq_len=512", "data.tasks.text_lm.seq_len", "tokenizers.text.max_len=128"),
    ("model.backbone.encoder_layers=0", "data.tasks.image_to_text.head", "model.backbone.encoder_layers=0"),
    ("tokenizers.image.patch_size=3", "tokenizers.image.patch_size", "divide size=8"),
    ("tokenizers.audio.patch_mels=10", "tokenizers.audio.patch_mels", "divide n_mels=64"),
    ("train.betas=[0.9]", "train.betas", "list of 2 values"),
    ("tracking.wandb.mode=on", "tracking.wandb.mode", "'disabled', 'offline', 'online'"),
    ("train=5", "train", "must be a mapping"),
    ("data.tasks.text_lm.head=masked_lm data.tasks.text_lm.source=image", "data.tasks.text_lm.source",
     "masked_lm reads text only"),
    ("data.tasks.text_lm.head=encoder_classifier", "data.tasks.text_lm.classes", "needs the names of at least two"),
    ("data.tasks.image_to_text.classes=[a,b]", "data.tasks.image_to_text.classes", "is for encoder_classifier"),
    ("data.tasks.text_lm.mask_probability=1.5", "data.tasks.text_lm.mask_probability", "must be in (0, 1)"),
    ("model.preset=decoder_2b", "model.preset", "unknown model preset; known: bart_base, base, decoder_1b"),
    ("finetune.timm_model=vit_tiny_patch16_224", "finetune.timm_model", "describes the file init_from names"),
    ("finetune.init_from=a finetune.init_parts.v.init_from=b finetune.init_parts.v.parts=[lm_head]",
     "finetune.init_parts",
     "replaces init_from"),
    ("finetune.init_parts.v.init_from=b finetune.init_parts.v.parts=[backbone]", "finetune.init_parts.v.parts.0",
     "is not a part: embedders.<modality>, backbone.encoder, backbone.decoder, lm_head or heads.<task>"),
    ("finetune.init_parts.v.init_from=b finetune.init_parts.v.parts=[heads.captions]",
     "finetune.init_parts.v.parts.0", "this run has no such task; it has image_to_text, audio_to_text, text_lm"),
    ("finetune.init_parts.v.init_from=b finetune.init_parts.v.parts=[lm_head] finetune.init_parts.w.init_from=c "
     "finetune.init_parts.w.parts=[lm_head]", "finetune.init_parts.w.parts.0", "comes from init_parts.v already"),
])
def test_bad_config_names_key_value_and_allowed(override, key, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, override.split())
    assert err.value.key == key
    message = str(err.value)
    assert message.startswith(f"{key}=")
    assert fragment in message


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"^data\.tasks\.lm\.val=None: is required"):
        from_dict(Config, {"data": {"tasks": {"lm": {"head": "decoder_only", "train": "a"}}}})


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="train.steps.*is a value, not a section"):
        apply_override({"train": {"steps": 5}}, "train.steps.x=1")


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        apply_override({}, "train.steps")


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listing)


def test_a_preset_gives_the_model_section_under_the_recipes_own_keys():
    from polytrain.config.registries import PRESETS

    cfg = load_config(None, ["data.tasks.lm.head=decoder_only", "data.tasks.lm.train=a", "data.tasks.lm.val=b",
                             "model.preset=decoder_1b", "model.backbone.decoder_layers=4", "model.init_std=0.01"])
    preset = PRESETS.get("decoder_1b").model
    assert cfg.model.backbone == preset.backbone.__class__(**{**preset.backbone.__dict__, "decoder_layers": 4})
    assert (cfg.model.init_std, cfg.model.tie_embeddings) == (0.01, False)
    assert "preset" not in to_dict(cfg)["model"]  # the resolved section is what a run saves


def test_every_preset_in_a_recipe_is_the_presets_model():
    from polytrain.config.registries import PRESETS

    for name in PRESETS.names():
        head = next(iter(PRESETS.get(name).task_heads.values()))  # a task the preset's stacks can run
        classes = ["data.tasks.lm.classes=[a, b]"] if head == "encoder_classifier" else []
        cfg = load_config(None, [f"data.tasks.lm.head={head}", "data.tasks.lm.train=a", "data.tasks.lm.val=b",
                                 f"model.preset={name}", *classes])
        assert cfg.model == PRESETS.get(name).model, name
