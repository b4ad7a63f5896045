import torch
from torch import nn

from polytrain.models.attention import MultiHeadAttention

DIM, HEADS = 32, 4


def reference_mha(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
    with torch.no_grad():
        if ours.cross:
            ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))
            ref.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
        else:
            ref.in_proj_weight.copy_(ours.qkv.weight)
            ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.out.weight)
        ref.out_proj.bias.copy_(ours.out.bias)
    return ref.eval()


def test_self_attention_with_padding_equals_torch_nn():
    torch.manual_seed(0)
    ours = MultiHeadAttention(DIM, HEADS, dropout=0.0).eval()
    x = torch.randn(3, 7, DIM)
    valid = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)
    got = ours(x, valid[:, None, None, :])
    want, _ = reference_mha(ours)(x, x, x, key_padding_mask=~valid)
    assert torch.allclose(got, want, atol=1e-5)


def test_causal_self_attention_equals_torch_nn():
    torch.manual_seed(1)
    ours = MultiHeadAttention(DIM, HEADS, dropout=0.0).eval()
    x = torch.randn(2, 6, DIM)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    want, _ = reference_mha(ours)(x, x, x, attn_mask=~causal)
    assert torch.allclose(ours(x, causal), want, atol=1e-5)


def test_cross_attention_equals_torch_nn():
    torch.manual_seed(2)
    ours = MultiHeadAttention(DIM, HEADS, dropout=0.0, cross=True).eval()
    x, memory = torch.randn(2, 5, DIM), torch.randn(2, 9, DIM)
    valid = torch.tensor([[1] * 9, [1] * 3 + [0] * 6], dtype=torch.bool)
    want, _ = reference_mha(ours)(x, memory, memory, key_padding_mask=~valid)
    assert torch.allclose(ours(x, valid[:, None, None, :], memory), want, atol=1e-5)
