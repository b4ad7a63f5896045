"""LoRA adapters against the closed form x W^T + b + (alpha / r) x A^T B^T and against torch.nn.Linear."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from polytrain.config.model import LoraConfig, ModelConfig
from polytrain.errors import ConfigError
from polytrain.models.lora import LoraLinear, add_lora, merge_lora
from polytrain.models.model import PolyModel
from polytrain.schema import from_dict
from polytrain.tokens import EmbedSpec, Segment, TaskBatch, text_tokens

SPECS = [EmbedSpec("text", 50, (1, 16)), EmbedSpec("image", 12, (2, 2))]


def tiny_model(vocab: int | None = None) -> PolyModel:
    """``vocab``: another text vocabulary size than SPECS'."""
    torch.manual_seed(0)
    cfg = ModelConfig()
    cfg = ModelConfig(backbone=type(cfg.backbone)(dim=32, n_heads=2, encoder_layers=1, decoder_layers=1))
    specs = SPECS if vocab is None else [replace(SPECS[0], input_dim=vocab), *SPECS[1:]]
    return PolyModel(cfg, specs, {"caption": "encoder_decoder"})


def batch() -> TaskBatch:
    torch.manual_seed(1)
    ids = torch.randint(8, 50, (3, 6))
    patches = Segment(torch.randn(3, 4, 12), torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]).expand(3, 4, 2),
                      torch.ones(3, 4, dtype=torch.bool), "image")
    return TaskBatch(Segment.collate([text_tokens(row) for row in ids]), ids, source=patches)


def test_fresh_adapter_computes_what_the_linear_did():
    base = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    want = base(x)
    assert torch.equal(LoraLinear(base, rank=2, scale=8.0, dropout=0.0)(x), want)


def test_adapter_output_equals_the_closed_form():
    base = nn.Linear(6, 5)
    layer = LoraLinear(base, rank=3, scale=16 / 3, dropout=0.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 6)
    want = x @ base.weight.T + base.bias + (16 / 3) * (x @ layer.lora_a.T) @ layer.lora_b.T
    assert torch.allclose(layer(x), want, atol=1e-5)


def test_merged_weights_in_a_plain_linear_equal_the_adapted_layer():
    layer = LoraLinear(nn.Linear(6, 5), rank=2, scale=4.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    merged = merge_lora({"fc." + k: v for k, v in layer.state_dict().items()}, scale=4.0)
    assert sorted(merged) == ["fc.bias", "fc.weight"]
    plain = nn.Linear(6, 5)
    plain.load_state_dict({k[3:]: v for k, v in merged.items()})
    x = torch.randn(4, 6)
    assert torch.allclose(plain(x), layer(x), atol=1e-5)


def test_add_lora_keeps_names_freezes_the_adapted_weights_and_only_adapters_learn():
    model = tiny_model()
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    reference = model.heads["caption"](model, batch())
    adapted = add_lora(model, LoraConfig(rank=4, targets=["*.attn.qkv", "*.mlp.fc"]))
    assert adapted == ["backbone.encoder.blocks.0.attn.qkv", "backbone.encoder.blocks.0.mlp.fc",
                       "backbone.decoder.blocks.0.attn.qkv", "backbone.decoder.blocks.0.mlp.fc"]
    missing, unexpected = model.load_state_dict(pretrained, strict=False)  # pretrained names load unchanged
    assert unexpected == [] and sorted(missing) == sorted(f"{n}.lora_{ab}" for n in adapted for ab in "ab")
    assert torch.equal(model.heads["caption"](model, batch()), reference)  # B = 0: nothing changed yet
    model.heads["caption"].loss(model, batch()).backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    for name in adapted:
        assert not model.get_submodule(name).weight.requires_grad and f"{name}.weight" not in grads
        assert grads[f"{name}.lora_b"].abs().sum() > 0
        assert torch.equal(grads[f"{name}.lora_a"], torch.zeros_like(grads[f"{name}.lora_a"]))  # dL/dA = 0 at B = 0


def test_a_target_that_matches_no_linear_names_the_key():
    with pytest.raises(ConfigError, match=r"finetune.lora.targets='\*\.attn\.qkvv': matches no linear layer"):
        add_lora(tiny_model(), LoraConfig(rank=2, targets=["*.attn.qkvv"]))


@pytest.mark.parametrize("field, value, fragment", [("rank", -1, "must be >= 0"), ("alpha", 0.0, "must be > 0"),
                                                     ("dropout", 1.0, r"must be in \[0, 1\)"),
                                                     ("targets", [], "needs at least one")])
def test_bad_lora_config_names_the_field(field, value, fragment):
    with pytest.raises(ConfigError, match=f"{field}=.*{fragment}"):
        from_dict(LoraConfig, {"rank": 2, field: value})
