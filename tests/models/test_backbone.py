import dataclasses
from dataclasses import replace

import pytest
import torch
from torch import nn

from polytrain.config.model import BackboneConfig
from polytrain.errors import ConfigError
from polytrain.models.attention import plan_attention
from polytrain.models.attention_mask import MaskRule
from polytrain.models.backbone import Backbone, Block
from polytrain.models.embed import Embedded
from polytrain.models.positions import Rotary
from polytrain.schema import from_dict

DIM, HEADS, HIDDEN = 32, 4, 64
CFG = BackboneConfig(dim=DIM, n_heads=HEADS, mlp_ratio=HIDDEN / DIM)


def copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    dst.weight.data.copy_(src.weight)
    dst.bias.data.copy_(src.bias)


def copy_mha(dst: nn.MultiheadAttention, src) -> None:
    if src.cross:
        dst.in_proj_weight.data.copy_(torch.cat([src.q.weight, src.kv.weight]))
        dst.in_proj_bias.data.copy_(torch.cat([src.q.bias, src.kv.bias]))
    else:
        dst.in_proj_weight.data.copy_(src.qkv.weight)
        dst.in_proj_bias.data.copy_(src.qkv.bias)
    dst.out_proj.weight.data.copy_(src.out.weight)
    dst.out_proj.bias.data.copy_(src.out.bias)


def copy_mlp(ref, block: Block) -> None:
    ref.linear1.weight.data.copy_(block.mlp.fc.weight)
    ref.linear1.bias.data.copy_(block.mlp.fc.bias)
    ref.linear2.weight.data.copy_(block.mlp.proj.weight)
    ref.linear2.bias.data.copy_(block.mlp.proj.bias)


def randomized(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in module.parameters():
        nn.init.normal_(p, std=0.3)
    return module.eval()


def plan(valid_q, valid_k=None, causal=False, self_attention=True):
    rule = MaskRule(valid_q if valid_k is None else valid_k, valid_q, causal, self_attention=self_attention)
    return plan_attention("auto", rule, torch.float32, DIM // HEADS, 0.0)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_encoder_block_equals_torch_encoder_layer(norm_position):
    cfg = dataclasses.replace(CFG, norm_position=norm_position)
    block = randomized(Block(cfg, cross_attention=False))
    ref = nn.TransformerEncoderLayer(DIM, HEADS, HIDDEN, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=norm_position == "pre").eval()
    copy_norm(ref.norm1, block.attn_norm)
    copy_norm(ref.norm2, block.mlp_norm)
    copy_mha(ref.self_attn, block.attn)
    copy_mlp(ref, block)
    x = torch.randn(2, 6, DIM)
    valid = torch.tensor([[1] * 6, [1] * 3 + [0] * 3], dtype=torch.bool)
    got = block(x, plan(valid))
    want = ref(x, src_key_padding_mask=~valid)
    assert torch.allclose(got[valid], want[valid], atol=1e-5)


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_decoder_block_equals_torch_decoder_layer(norm_position):
    cfg = dataclasses.replace(CFG, norm_position=norm_position)
    block = randomized(Block(cfg, cross_attention=True))
    ref = nn.TransformerDecoderLayer(DIM, HEADS, HIDDEN, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=norm_position == "pre").eval()
    copy_norm(ref.norm1, block.attn_norm)
    copy_norm(ref.norm2, block.cross_norm)
    copy_norm(ref.norm3, block.mlp_norm)
    copy_mha(ref.self_attn, block.attn)
    copy_mha(ref.multihead_attn, block.cross)
    copy_mlp(ref, block)
    x, memory = torch.randn(2, 5, DIM), torch.randn(2, 7, DIM)
    valid = torch.ones(2, 5, dtype=torch.bool)
    memory_valid = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    got = block(x, plan(valid, causal=True), memory_BSE=memory,
                memory_plan=plan(valid, memory_valid, self_attention=False))
    want = ref(x, memory, tgt_mask=~torch.ones(5, 5, dtype=torch.bool).tril(), memory_key_padding_mask=~memory_valid)
    assert torch.allclose(got, want, atol=1e-5)


def backbone(**changes) -> Backbone:
    torch.manual_seed(0)
    return Backbone(dataclasses.replace(CFG, encoder_layers=2, decoder_layers=2, **changes)).eval()


def embedded(x, valid=None, docs=None, rope=None) -> Embedded:
    valid = torch.ones(x.shape[:2], dtype=torch.bool) if valid is None else valid
    return Embedded(x, valid, docs, rope)


@pytest.mark.parametrize("position", ["learned", "alibi"])
def test_decoder_is_causal(position):
    model = backbone(position=position)
    x = torch.randn(1, 8, DIM)
    changed = x.clone()
    changed[:, 5:] = torch.randn(1, 3, DIM)
    a, b = model.decode(embedded(x)), model.decode(embedded(changed))
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("position", ["learned", "alibi"])
def test_padding_does_not_change_real_tokens(position):
    model = backbone(position=position)
    x = torch.randn(1, 5, DIM)
    padded = torch.cat([x, 100 * torch.randn(1, 4, DIM)], dim=1)
    valid = torch.tensor([[1] * 5 + [0] * 4], dtype=torch.bool)
    memory = torch.randn(1, 3, DIM)
    memory_padded = torch.cat([memory, torch.randn(1, 2, DIM)], dim=1)
    memory_valid = torch.tensor([[1] * 3 + [0] * 2], dtype=torch.bool)
    enc, enc_padded = model.encode(embedded(x)), model.encode(embedded(padded, valid))
    assert torch.allclose(enc, enc_padded[:, :5], atol=1e-5)
    dec = model.decode(embedded(x), memory, torch.ones(1, 3, dtype=torch.bool))
    dec_padded = model.decode(embedded(padded, valid), memory_padded, memory_valid)
    assert torch.allclose(dec, dec_padded[:, :5], atol=1e-5)


def test_prefix_lm_is_bidirectional_over_the_prefix_and_causal_over_the_text():
    model = backbone()
    x = torch.randn(1, 9, DIM)
    prefix_span = torch.tensor([[0] * 4 + [-1] * 5])

    def decode(y):
        return model.decode(replace(embedded(y), spans_BL=prefix_span))

    base = decode(x)

    def changed_at(i):
        y = x.clone()
        y[:, i] = torch.randn(DIM)
        return decode(y)

    last_prefix, text = changed_at(3), changed_at(6)
    assert not torch.allclose(last_prefix[:, 0], base[:, 0])  # the prefix sees all of itself
    assert torch.allclose(text[:, :6], base[:, :6], atol=1e-6)  # nothing sees a later text token
    assert not torch.allclose(text[:, 6:], base[:, 6:])


@pytest.mark.parametrize("stack", ["encode", "decode"])
@pytest.mark.parametrize("position", ["learned", "rope", "alibi"])
def test_packed_documents_equal_separate_rows(stack, position):
    model = backbone(position=position)
    a, b = torch.randn(1, 5, DIM), torch.randn(1, 3, DIM)
    rotary = Rotary(DIM // HEADS, 10000.0, two_d=False) if position == "rope" else None

    def rope(cols):
        return None if rotary is None else rotary(torch.stack([torch.zeros_like(cols), cols], -1)[None])

    run = getattr(model, stack)
    separate = torch.cat([run(embedded(a, rope=rope(torch.arange(5)))), run(embedded(b, rope=rope(torch.arange(3))))], 1)
    packed_x = torch.cat([a, b, torch.randn(1, 2, DIM)], 1)
    valid = torch.tensor([[1] * 8 + [0] * 2], dtype=torch.bool)
    docs = torch.tensor([[0] * 5 + [1] * 3 + [-1] * 2])
    cols = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 0])
    packed = run(embedded(packed_x, valid, docs, rope(cols)))
    assert torch.allclose(packed[:, :8], separate, atol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients():
    grads, block_calls = [], []
    for checkpointing in (False, True):
        model = backbone(checkpointing=checkpointing).train()
        calls = []
        for block in model.encoder.blocks:
            block.register_forward_pre_hook(lambda *_: calls.append(1))
        x = torch.randn(2, 6, DIM)
        model.decode(embedded(x), model.encode(embedded(x)), torch.ones(2, 6, dtype=torch.bool)).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        block_calls.append(len(calls))
    assert block_calls == [2, 4]  # checkpointed blocks run again in the backward pass
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_dropout_and_drop_path_act_in_training_only():
    model = backbone(dropout=0.2, drop_path=0.3)
    x = torch.randn(2, 6, DIM)
    assert torch.equal(model.encode(embedded(x)), model.encode(embedded(x)))
    model.train()
    assert not torch.allclose(model.encode(embedded(x)), model.encode(embedded(x)))
    rates = [block.drop_path.rate for block in model.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.3])


VARIANTS = {
    "default": dict(),
    "post_rmsnorm_swiglu": dict(norm_position="post", norm="rmsnorm", mlp="swiglu", bias=False),
    "rope_gqa": dict(position="rope", n_kv_heads=2),
    "alibi_mqa": dict(position="alibi", n_kv_heads=1),
    "training_dropout": dict(dropout=0.1, drop_path=0.1),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cross", [False, True])
def test_block_compiles_with_fullgraph_and_matches_eager(variant, cross):
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    torch.manual_seed(0)
    block = Block(cfg, cross_attention=cross, drop_path=cfg.drop_path)
    block.train(cfg.dropout > 0)
    x, memory = torch.randn(2, 6, DIM), torch.randn(2, 4, DIM)
    valid = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    memory_valid = torch.tensor([[1] * 4, [1] * 3 + [0]], dtype=torch.bool)
    rope = Rotary(DIM // HEADS, 10000.0, False)(torch.randint(0, 9, (2, 6, 2))) if cfg.position == "rope" else None
    self_plan = plan_attention("auto", MaskRule(valid, valid, True), torch.float32, DIM // HEADS, cfg.dropout,
                               Backbone(cfg).decoder.alibi_H)
    cross_plan = plan(valid, memory_valid, self_attention=False)
    args = (x, self_plan, rope, memory if cross else None, cross_plan if cross else None)
    torch._dynamo.reset()  # every variant compiles Block.forward afresh, not as a recompile
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    want = block(*args)
    torch.manual_seed(1)
    got = compiled(*args)
    got.sum().backward()  # the backward traces too
    if cfg.dropout == 0:
        assert torch.allclose(got, want, atol=1e-5)


BAD = {
    "n_heads": dict(n_heads=5),
    "n_kv_heads": dict(n_kv_heads=3),
    "decoder_layers": dict(encoder_layers=0, decoder_layers=0),
    "mlp": dict(mlp="geglu2"),
    "norm": dict(norm="batchnorm"),
    "position": dict(position="rotary"),
    "attention": dict(attention="flash3"),
    "dropout": dict(dropout=1.0),
    "drop_path": dict(drop_path=-0.1),
    "rope_base": dict(rope_base=1.0),
}


@pytest.mark.parametrize("key", BAD)
def test_bad_backbone_config_names_the_key(key):
    with pytest.raises(ConfigError) as err:
        from_dict(BackboneConfig, {"dim": DIM, "n_heads": 4, **BAD[key]})
    assert err.value.key == key


def test_rope_needs_head_dim_divisible_by_four():
    with pytest.raises(ConfigError, match="divisible by 4"):
        BackboneConfig(dim=24, n_heads=4, position="rope").check()


def test_encoder_only_and_decoder_only_backbones():
    decoder_only = Backbone(dataclasses.replace(CFG, encoder_layers=0, decoder_layers=3))
    assert decoder_only.encoder is None and all(block.cross is None for block in decoder_only.decoder.blocks)
    encoder_only = Backbone(dataclasses.replace(CFG, encoder_layers=2, decoder_layers=0))
    assert encoder_only.decoder is None and len(encoder_only.encoder.blocks) == 2
