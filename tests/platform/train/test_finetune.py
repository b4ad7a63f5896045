"""Fine-tuning controls in one process: freezing by pattern, the init_from report, and bad init_from sources."""

import pickle

import pytest
import torch
from safetensors.torch import save_file

from polytrain.config.model import LoraConfig
from polytrain.config.train import FinetuneConfig
from polytrain.errors import ConfigError, DataError
from polytrain.platform.train.finetune import adapt, freeze
from polytrain.platform.train.init_from import InitReport, by_name, load_initial_weights, read_pretrained
from polytrain.schema import from_dict
from tests.models.test_lora import tiny_model


def load(model, source: str, weights: dict) -> InitReport:
    """A polytrain checkpoint's ``weights`` into ``model`` by name."""
    return load_initial_weights(model, [by_name(source, weights, set(model.state_dict()))])


def test_freeze_until_wins_over_freeze_and_adapters_always_train():
    model = tiny_model()
    adapt(model, FinetuneConfig(lora=LoraConfig(rank=2, targets=["*.attn.qkv"])))
    starts, _ = freeze(model, FinetuneConfig(freeze=["backbone.*"], freeze_until={"backbone.decoder.*": 50}))
    params = dict(model.named_parameters())
    assert set(starts.values()) == {50}
    frozen = {n for n, p in params.items() if not p.requires_grad}
    adapted = {"backbone.decoder.blocks.0.attn.qkv.weight", "backbone.decoder.blocks.0.attn.qkv.bias"}
    assert frozen == {n for n in params if n.startswith("backbone.encoder.") and ".lora_" not in n} | adapted
    assert set(starts) == {n for n in params if n.startswith("backbone.decoder.") and ".lora_" not in n} - adapted
    assert params["backbone.encoder.blocks.0.attn.qkv.lora_a"].requires_grad
    assert all(p.requires_grad for n, p in params.items() if n.startswith(("embedders.", "heads.")))


@pytest.mark.parametrize("cfg, key", [(FinetuneConfig(freeze=["backbone.*", "decoder.*"]), "finetune.freeze"),
                                      (FinetuneConfig(freeze_until={"embedder.*": 3}), "finetune.freeze_until")])
def test_a_pattern_that_matches_nothing_names_the_key(cfg, key):
    with pytest.raises(ConfigError, match=rf"{key}='[^']+': matches no parameter; names look like embedders\."):
        freeze(tiny_model(), cfg)


def test_bad_finetune_values_name_the_key():
    with pytest.raises(ConfigError, match=r"freeze_until.backbone.\*=0: must be an optimizer step >= 1"):
        from_dict(FinetuneConfig, {"freeze_until": {"backbone.*": 0}})
    with pytest.raises(ConfigError, match=r"lr_scale.embedders.\*=-1.0: must be >= 0"):
        from_dict(FinetuneConfig, {"lr_scale": {"embedders.*": -1.0}})


def test_init_report_names_loaded_new_and_ignored_tensors():
    source = tiny_model().state_dict()
    source["heads.old_task.proj.weight"] = torch.zeros(2, 2)
    del source["embedders.image.proj.weight"]
    source = {name: t + 1 for name, t in source.items()}
    model = tiny_model()
    report = load(model, "pre.safetensors", source)
    assert report.new == ["embedders.image.proj.weight"] and report.ignored == ["heads.old_task.proj.weight"]
    assert len(report.loaded) == len(model.state_dict()) - 1
    for name, tensor in model.state_dict().items():
        if name in report.loaded:
            assert torch.equal(tensor, source[name]), name


def test_a_vocabulary_that_grew_keeps_its_trained_rows_and_initializes_the_new_ones():
    source = {name: t + 1 for name, t in tiny_model().state_dict().items()}
    table = "embedders.text.table.weight"
    model = tiny_model(vocab=len(source[table]) + 2)  # e.g. a plugin modality's two span markers
    fresh = model.state_dict()[table][-2:].clone()
    report = load(model, "pre", source)
    assert report.extended == [table] and table in report.loaded and "vocabulary extended" in report.summary()
    assert torch.equal(model.state_dict()[table][:-2], source[table])
    assert torch.equal(model.state_dict()[table][-2:], fresh)
    shrunk = tiny_model(vocab=len(source[table]) - 1)
    with pytest.raises(DataError, match=rf"{table}: pre has"):
        load(shrunk, "pre", source)


def test_a_checkpoint_of_another_architecture_names_the_tensor_and_both_shapes():
    source = tiny_model().state_dict()
    source["backbone.encoder.blocks.0.attn.qkv.weight"] = torch.zeros(48, 16)
    with pytest.raises(DataError, match=r"another architecture.*backbone\.encoder\.blocks\.0\.attn\.qkv\.weight: "
                                        r"pre has \(48, 16\), the model \(96, 32\)"):
        load(tiny_model(), "pre", source)
    with pytest.raises(DataError, match=r"other\.safetensors shares no tensor name with this model.*conv1\.weight"):
        load(tiny_model(), "other.safetensors", {"conv1.weight": torch.zeros(3)})


def test_init_from_sources_that_are_not_polytrain_weights(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}/nothing: no such file or directory"):
        read_pretrained(tmp_path / "nothing")
    (tmp_path / "run").mkdir()
    with pytest.raises(DataError, match=r"run: no checkpoint .* is this a polytrain run directory"):
        read_pretrained(tmp_path / "run")
    pickled = tmp_path / "model.pt"
    pickled.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    with pytest.raises(DataError, match=r"model\.pt: not a safetensors file, a run directory or a checkpoint folder"):
        read_pretrained(pickled)
    bare = tmp_path / "bare.safetensors"
    save_file({"weight": torch.zeros(2)}, bare)
    with pytest.raises(DataError, match=r"bare\.safetensors: not a polytrain export .*polytrain export RUN_DIR"):
        read_pretrained(bare)
