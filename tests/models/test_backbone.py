import torch
from torch import nn

from polytrain.models.backbone import Backbone, BackboneConfig, Block

DIM, HEADS, HIDDEN = 32, 4, 64


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


def test_encoder_block_equals_torch_pre_norm_encoder_layer():
    block = randomized(Block(DIM, HEADS, HIDDEN, 0.0, 1e-5, cross_attention=False))
    ref = nn.TransformerEncoderLayer(DIM, HEADS, HIDDEN, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=True).eval()
    copy_norm(ref.norm1, block.attn_norm)
    copy_norm(ref.norm2, block.mlp_norm)
    copy_mha(ref.self_attn, block.attn)
    copy_mlp(ref, block)
    x = torch.randn(2, 6, DIM)
    valid = torch.tensor([[1] * 6, [1] * 3 + [0] * 3], dtype=torch.bool)
    got = block(x, valid[:, None, None, :])
    want = ref(x, src_key_padding_mask=~valid)
    assert torch.allclose(got[valid], want[valid], atol=1e-5)


def test_decoder_block_equals_torch_pre_norm_decoder_layer():
    block = randomized(Block(DIM, HEADS, HIDDEN, 0.0, 1e-5, cross_attention=True))
    ref = nn.TransformerDecoderLayer(DIM, HEADS, HIDDEN, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=True).eval()
    copy_norm(ref.norm1, block.attn_norm)
    copy_norm(ref.norm2, block.cross_norm)
    copy_norm(ref.norm3, block.mlp_norm)
    copy_mha(ref.self_attn, block.attn)
    copy_mha(ref.multihead_attn, block.cross)
    copy_mlp(ref, block)
    x, memory = torch.randn(2, 5, DIM), torch.randn(2, 7, DIM)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    memory_valid = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    got = block(x, causal, memory, memory_valid[:, None, None, :])
    want = ref(x, memory, tgt_mask=~causal, memory_key_padding_mask=~memory_valid)
    assert torch.allclose(got, want, atol=1e-5)


def backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone(BackboneConfig(dim=DIM, n_heads=HEADS, encoder_layers=2, decoder_layers=2)).eval()


def test_decoder_is_causal():
    model = backbone()
    x = torch.randn(1, 8, DIM)
    valid = torch.ones(1, 8, dtype=torch.bool)
    changed = x.clone()
    changed[:, 5:] = torch.randn(1, 3, DIM)
    a, b = model.decode(x, valid), model.decode(changed, valid)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_padding_does_not_change_real_tokens():
    model = backbone()
    x = torch.randn(1, 5, DIM)
    padded = torch.cat([x, 100 * torch.randn(1, 4, DIM)], dim=1)
    valid = torch.tensor([[1] * 5 + [0] * 4], dtype=torch.bool)
    memory, memory_padded = torch.randn(1, 3, DIM), None
    memory_padded = torch.cat([memory, torch.randn(1, 2, DIM)], dim=1)
    memory_valid = torch.tensor([[1] * 3 + [0] * 2], dtype=torch.bool)
    enc, enc_padded = model.encode(x, valid[:, :5]), model.encode(padded, valid)
    assert torch.allclose(enc, enc_padded[:, :5], atol=1e-5)
    dec = model.decode(x, valid[:, :5], memory, torch.ones(1, 3, dtype=torch.bool))
    dec_padded = model.decode(padded, valid, memory_padded, memory_valid)
    assert torch.allclose(dec, dec_padded[:, :5], atol=1e-5)


def test_decoder_only_backbone_has_no_encoder_or_cross_attention():
    model = Backbone(BackboneConfig(dim=DIM, n_heads=HEADS, encoder_layers=0, decoder_layers=3))
    assert model.encoder is None
    assert all(block.cross is None for block in model.decoder.blocks)
