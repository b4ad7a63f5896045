"""Every attention kernel on the device against the CPU math path, forward and backward, on every kind of mask.

Each case runs one kernel in bf16 on the ``device`` (the GPU where there is one, else the CPU) and SDPA's
math backend in fp32 on the CPU, on the same inputs (drawn in fp32 and rounded to bf16, so both sides start
from the same numbers) and the same upstream gradient; the output and the gradients of q, k and v agree
within bf16 tolerance.  A padded query's output is ignored by design, so it gets no upstream gradient and
its output is not compared.

Cases: each of ``MASK_CASES`` on rows with padding, plus no mask at all and a plain causal mask on rows
without (the only calls SDPA's flash backend takes on CUDA), with multi-head and grouped-query heads, and
ALiBi on two.  A kernel that cannot take a call is skipped with the reason: polytrain's ``why_not`` (on the
CPU: SDPA's cuDNN and memory-efficient backends, FlexAttention's backward and ``flash_attn`` are CUDA's),
or torch's when an SDPA backend held to itself rejects the inputs.
"""

import dataclasses
import warnings

import pytest
import torch

from polytrain.errors import PolytrainError
from polytrain.models.attention import AttentionPlan, plan_attention
from polytrain.models.attention_mask import MaskRule
from polytrain.models.positions import alibi_slopes
from tests.models.reference import MASK_CASES, mask_rule

pytestmark = pytest.mark.gpu

KERNELS = ["sdpa", "sdpa_math", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex", "flash_attn"]
BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 200, 4, 2, 64
"""200 tokens span two of FlexAttention's 128-token tiles without filling them; GQA shares each k/v head by 2."""
PADDED = torch.tensor([[True] * LENGTH, [True] * 150 + [False] * 50])
UNPADDED = torch.ones(BATCH, LENGTH, dtype=torch.bool)
DOCS = torch.tensor([[0] * 70 + [1] * 50 + [2] * 80, [0] * 40 + [1] * 60 + [2] * 50 + [-1] * 50])
"""Packed documents of each row (-1: padding)."""
CASES = {
    **{f"{mask}/{name}": (mask, PADDED, kv_heads, False)
       for mask in MASK_CASES for name, kv_heads in (("mha", HEADS), ("gqa", KV_HEADS))},
    "no_mask/mha": ("padding", UNPADDED, HEADS, False),
    "causal/mha": ("causal_padding", UNPADDED, HEADS, False),
    "causal/gqa": ("causal_padding", UNPADDED, KV_HEADS, False),
    "causal_padding/alibi": ("causal_padding", PADDED, HEADS, True),
    "packed_documents/alibi": ("packed_documents", PADDED, KV_HEADS, True),
}
"""Case name -> (``MASK_CASES`` rule, which rows are real, key/value heads, ALiBi)."""
SDPA_REFUSALS = ("No available kernel", "No viable backend")
"""How torch's SDPA says (on CUDA, on CPU) that the backends it was held to cannot take the inputs."""
BF16_TOLERANCE = 2e-2
"""Allowed error, relative to each value plus the same fraction of the largest one: a few bf16 roundings
(8 significant bits) of every input and output, with fp32 accumulation in every kernel."""


def on_device(rule: MaskRule, device: torch.device) -> MaskRule:
    tensors = {f.name: getattr(rule, f.name).to(device) for f in dataclasses.fields(rule)
               if isinstance(getattr(rule, f.name), torch.Tensor)}
    return dataclasses.replace(rule, **tensors)


def attend(plan: AttentionPlan, q, k, v, grad) -> list[torch.Tensor]:
    """Output and the gradients of q, k and v for upstream gradient ``grad``, as fp32 on the CPU."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = plan(q, k, v, 0.0)
    return [t.float().cpu() for t in (out, *torch.autograd.grad(out, (q, k, v), grad))]


def on_device_or_skip(kernel: str, device: torch.device, rule: MaskRule, slopes, q, k, v, grad
                      ) -> list[torch.Tensor]:
    """``attend`` with ``kernel`` on ``device`` in bf16; a kernel that refuses the call skips the test, saying why."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            plan = plan_attention(kernel, on_device(rule, device), torch.bfloat16, HEAD_DIM, 0.0, slopes)
            return attend(plan, *(t.to(device, torch.bfloat16) for t in (q, k, v, grad)))
        except PolytrainError as err:
            pytest.skip(str(err))
        except RuntimeError as err:
            if not any(refusal in str(err) for refusal in SDPA_REFUSALS):
                raise
            reasons = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
            pytest.skip(f"{kernel}: torch refuses: " + "; ".join(reasons or [str(err)]))


def assert_close_bf16(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    error, allowed = (got - want).abs(), BF16_TOLERANCE * (want.abs() + want.abs().max())
    worst = (error - allowed).argmax()
    at = tuple(int(i) for i in torch.unravel_index(worst, error.shape))  # (batch, position, head, channel)
    assert bool((error <= allowed).all()), (f"{what}: |error| {error.flatten()[worst]:.3g} > "
                                            f"{allowed.flatten()[worst]:.3g} at {at}; largest |value| "
                                            f"{want.abs().max():.3g}")


@pytest.fixture(autouse=True)
def fresh_compiles():
    """Each case compiles FlexAttention anew: with more distinct masks in one process than torch.compile's
    recompile limit, flex would fall back to eager and the fused kernel would go untested."""
    torch._dynamo.reset()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_each_kernel_on_the_device_equals_the_cpu_math_path_forward_and_backward(device, kernel, case):
    mask, valid, kv_heads, alibi = CASES[case]
    rule = mask_rule(mask, valid, DOCS)
    slopes = alibi_slopes(HEADS) if alibi else None
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(BATCH, LENGTH, heads, HEAD_DIM, generator=g).bfloat16().float()
               for heads in (HEADS, kv_heads, kv_heads))
    grad = torch.randn(BATCH, LENGTH, HEADS, HEAD_DIM, generator=g).bfloat16().float() * valid[:, :, None, None]
    want = attend(plan_attention("sdpa_math", rule, torch.float32, HEAD_DIM, 0.0, slopes), q, k, v, grad)
    got = on_device_or_skip(kernel, device, rule, slopes, q, k, v, grad)
    real = valid[:, :, None, None].float()
    assert_close_bf16(got[0] * real, want[0] * real, "output")
    for name, got_grad, want_grad in zip(("dq", "dk", "dv"), got[1:], want[1:]):
        assert_close_bf16(got_grad, want_grad, name)
