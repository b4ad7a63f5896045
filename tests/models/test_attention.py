import logging

import pytest
import torch
from torch import nn

from polytrain.config.registries import KERNELS
from polytrain.errors import PolytrainError
from polytrain.models.attention import Attention, flash_attn_module, plan_attention
from polytrain.models.attention_mask import MaskRule
from polytrain.models.positions import alibi_slopes
from tests.models.reference import MASK_CASES, allowed_by_loops, mask_case, reference_attention

DIM, HEADS = 32, 4


def plan(rule: MaskRule, kernel: str = "auto", alibi=None, dtype=torch.float32):
    return plan_attention(kernel, rule, dtype, DIM // HEADS, 0.0, alibi)


def reference_mha(ours: Attention) -> nn.MultiheadAttention:
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
    ours = Attention(DIM, HEADS, HEADS, bias=True, dropout=0.0).eval()
    x = torch.randn(3, 7, DIM)
    valid = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], dtype=torch.bool)
    got = ours(x, plan(MaskRule(valid, valid, self_attention=False)))
    want, _ = reference_mha(ours)(x, x, x, key_padding_mask=~valid)
    assert torch.allclose(got, want, atol=1e-5)


def test_causal_self_attention_equals_torch_nn():
    torch.manual_seed(1)
    ours = Attention(DIM, HEADS, HEADS, bias=True, dropout=0.0).eval()
    x = torch.randn(2, 6, DIM)
    valid = torch.ones(2, 6, dtype=torch.bool)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    want, _ = reference_mha(ours)(x, x, x, attn_mask=~causal)
    assert torch.allclose(ours(x, plan(MaskRule(valid, valid, causal=True))), want, atol=1e-5)


def test_cross_attention_equals_torch_nn():
    torch.manual_seed(2)
    ours = Attention(DIM, HEADS, HEADS, bias=True, dropout=0.0, cross=True).eval()
    x, memory = torch.randn(2, 5, DIM), torch.randn(2, 9, DIM)
    valid = torch.tensor([[1] * 9, [1] * 3 + [0] * 6], dtype=torch.bool)
    want, _ = reference_mha(ours)(x, memory, memory, key_padding_mask=~valid)
    rule = MaskRule(valid, torch.ones(2, 5, dtype=torch.bool), self_attention=False)
    assert torch.allclose(ours(x, plan(rule), memory_BSE=memory), want, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["multi-head", "grouped-query", "multi-query"])
def test_grouped_and_multi_query_attention_share_key_value_heads(kv_heads):
    torch.manual_seed(3)
    ours = Attention(DIM, HEADS, kv_heads, bias=False, dropout=0.0).eval()
    head_dim = DIM // HEADS
    assert ours.qkv.weight.shape == ((HEADS + 2 * kv_heads) * head_dim, DIM)
    x = torch.randn(2, 6, DIM)
    valid = torch.ones(2, 6, dtype=torch.bool)
    q, k, v = (x @ ours.qkv.weight.T).split([HEADS * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    heads = [q.view(2, 6, HEADS, head_dim), k.view(2, 6, kv_heads, head_dim), v.view(2, 6, kv_heads, head_dim)]
    want = reference_attention(*heads, allowed_by_loops(valid, valid, causal=True)).flatten(2).float() @ ours.out.weight.T
    assert torch.allclose(ours(x, plan(MaskRule(valid, valid, causal=True))), want, atol=1e-5)


VALID = torch.tensor([[1] * 10, [1] * 7 + [0] * 3], dtype=torch.bool)
DOCS = torch.tensor([[0] * 4 + [1] * 3 + [2] * 3, [0] * 2 + [1] * 5 + [-1] * 3])


def kernel_case(mask: str, kv_heads: int = 2, seed: int = 0):
    rule, allowed = mask_case(mask, VALID, DOCS)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 10, h, 8, generator=g) for h in (HEADS, kv_heads, kv_heads))
    return rule, allowed, q, k, v


CPU_KERNELS = ["sdpa", "sdpa_math", "sdpa_flash", "flex"]
"""What runs on CPU: SDPA's own choice, its math and (CPU) flash backends, and FlexAttention unfused."""


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("mask", MASK_CASES)
@pytest.mark.parametrize("alibi", [False, True], ids=["no_alibi", "alibi"])
def test_every_cpu_kernel_equals_longhand_attention(kernel, mask, alibi):
    rule, allowed, q, k, v = kernel_case(mask)
    slopes = alibi_slopes(HEADS) if alibi else None
    bias = None
    if alibi:
        distance = (torch.arange(10)[:, None] - torch.arange(10)[None, :]).abs()
        bias = -slopes[:, None, None] * distance
    with torch.no_grad():  # FlexAttention has no backward on CPU
        got = plan(rule, kernel, slopes)(q, k, v, 0.0)
    want = reference_attention(q, k, v, allowed, bias).float()
    real = VALID[:, :, None, None].expand_as(got)  # padded queries' outputs are ignored by design
    assert torch.allclose(got[real], want[real], atol=1e-5)


def test_sdpa_held_to_one_backend_says_why_it_cannot_take_a_call():
    valid, padded = torch.ones(2, 6, dtype=torch.bool), torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    causal, padded_causal = MaskRule(valid, valid, causal=True), MaskRule(padded, padded, causal=True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # why_not reads the device's type only

    def why(kernel, rule=causal, device=cpu, dtype=torch.bfloat16, alibi=False):
        return KERNELS.get(kernel).why_not(rule, dtype, device, DIM // HEADS, 0.0, alibi)

    assert why("sdpa_cudnn") == "torch has SDPA's cuDNN backend on CUDA only"
    assert why("sdpa_efficient") == "torch has SDPA's memory-efficient backend on CUDA only"
    assert [why(k, padded_causal, alibi=True) for k in ("sdpa", "sdpa_math", "sdpa_flash")] == [None] * 3
    assert [why(k, device=cuda) for k in ("sdpa_cudnn", "sdpa_efficient", "sdpa_flash")] == [None] * 3
    no_mask = ("SDPA's flash backend on CUDA takes no mask: only rows without padding, documents, spans or ALiBi "
               "(causal or not)")
    assert why("sdpa_flash", padded_causal, cuda) == why("sdpa_flash", causal, cuda, alibi=True) == no_mask
    assert why("sdpa_flash", device=cuda, dtype=torch.float32) == ("SDPA's flash backend on CUDA needs fp16 or bf16, "
                                                                   "got torch.float32")


def test_flex_block_mask_skips_other_documents_and_equals_the_dense_mask():
    length, tile = 512, 128  # FlexAttention's default block is 128 x 128 tokens
    docs = (torch.arange(length) // tile)[None]  # four packed documents, one per tile
    valid = torch.ones(1, length, dtype=torch.bool)
    rule = MaskRule(valid, valid, causal=True, query_docs_BL=docs, key_docs_BS=docs)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, length, h, 8, generator=g) for h in (HEADS, 2, 2))
    with torch.no_grad():  # FlexAttention has no backward on CPU
        flex = plan(rule, "flex")
        got = flex(q, k, v, 0.0)
        dense = plan(rule, "sdpa_math")
        want = dense(q, k, v, 0.0)
    assert torch.equal(flex.block_mask.to_dense()[0, 0].bool(), torch.eye(4, dtype=torch.bool))  # 12 of 16 skipped
    assert torch.equal(dense.mask[0, 0], torch.block_diag(*[torch.ones(tile, tile).tril()] * 4).bool())
    assert torch.allclose(got, want, atol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_logs_the_choice_once(caplog):
    rule, _, q, k, v = kernel_case("packed_documents")
    from polytrain.models.attention import announce

    announce.cache_clear()
    with caplog.at_level(logging.INFO, logger="polytrain.models.attention"):
        first, second = plan(rule), plan(rule)
    assert first.kernel.name == second.kernel.name == "sdpa"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("attention kernel: sdpa (auto; not flash_attn:")


def test_a_kernel_that_cannot_take_the_call_is_refused_with_the_reason():
    rule, *_ = kernel_case("padding")
    if flash_attn_module() is None:
        with pytest.raises(PolytrainError, match="flash_attn.*not installed"):
            plan(rule, "flash_attn")
    with pytest.raises(PolytrainError, match="no backward on CPU"):
        plan(rule, "flex")  # grad is enabled here


def test_kernel_registry_lists_every_kernel():
    assert KERNELS.names() == ["flash_attn", "flex", "sdpa", "sdpa_cudnn", "sdpa_efficient", "sdpa_flash", "sdpa_math"]
