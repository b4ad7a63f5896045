"""The model settings the conversions brought: defaults that change nothing, checks that name the key."""

import pytest
import torch

from polytrain.config.model import BackboneConfig, EmbedConfig, ModelConfig
from polytrain.errors import ConfigError
from polytrain.models.backbone import Block
from polytrain.models.heads import text_segment
from polytrain.models.model import PolyModel
from polytrain.schema import from_dict
from polytrain.tokens import EmbedSpec, TaskBatch


def test_bias_flags_follow_bias_unless_set():
    assert BackboneConfig().biases == (True, True, True)
    assert BackboneConfig(bias=False).biases == (False, False, False)
    assert BackboneConfig(bias=False, qkv_bias=True).biases == (True, False, False)  # Qwen2
    block = Block(BackboneConfig(dim=32, n_heads=4, bias=True, out_bias=False, mlp_bias=False), cross_attention=True)
    assert block.attn.qkv.bias is not None and block.cross.q.bias is not None and block.cross.kv.bias is not None
    assert block.attn.out.bias is None and block.cross.out.bias is None
    assert block.mlp.fc.bias is None and block.mlp.proj.bias is None


def test_mlp_width_overrides_the_ratio():
    assert BackboneConfig(dim=224, mlp_ratio=976 / 224).mlp_hidden == 975  # what a ratio alone gives
    assert BackboneConfig(dim=224, mlp_width=976).mlp_hidden == 976
    assert Block(BackboneConfig(dim=32, n_heads=4, mlp_width=40), cross_attention=False).mlp.fc.out_features == 40


def test_decoder_positions_give_the_decoder_its_own_table():
    cfg = ModelConfig(backbone=BackboneConfig(dim=32, n_heads=4), embed=EmbedConfig(decoder_positions=True))
    torch.manual_seed(0)
    model = PolyModel(cfg, [EmbedSpec("text", 50, (1, 16))], {"t": "encoder_decoder"}).eval()
    ids = torch.randint(0, 50, (2, 7))
    text, embedder = text_segment(ids), model.embedders["text"]
    positions = text.positions[..., 1]
    assert torch.equal(model.embed(text).x_BLE, embedder.table(ids) + embedder.position(positions) + embedder.modality)
    assert torch.equal(model.embed(text, decoder=True).x_BLE,
                       embedder.table(ids) + embedder.decoder_position(positions) + embedder.modality)
    logits = model.heads["t"](model, TaskBatch(text, ids, text))
    with torch.no_grad():
        embedder.decoder_position.weight.zero_()
    assert not torch.allclose(logits, model.heads["t"](model, TaskBatch(text, ids, text)))


@pytest.mark.parametrize("section, value, key", [
    ("model", dict(backbone=dict(mlp_width=-1)), "model.backbone.mlp_width"),
    ("model", dict(backbone=dict(qkv_bias="yes")), "model.backbone.qkv_bias"),
    ("model", dict(embed=dict(token_types=-2)), "model.embed.token_types"),
    ("model", dict(backbone=dict(decoder_layers=0), embed=dict(decoder_positions=True)),
     "model.embed.decoder_positions"),
    ("model", dict(backbone=dict(position="rope"), embed=dict(decoder_positions=True)),
     "model.embed.decoder_positions"),
    ("model", dict(lm_bias=1), "model.lm_bias"),
    ("model", dict(heads=dict(classifier=dict(pooler="no"))), "model.heads.classifier.pooler"),
])
def test_bad_values_name_the_key(section, value, key):
    with pytest.raises(ConfigError) as err:
        from_dict(ModelConfig, value, section)
    assert err.value.key == key
