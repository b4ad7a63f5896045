"""Attention: the one place that picks a kernel, and the multi-head / grouped-query attention layer.

Kernels, by name (``model.backbone.attention``):

- ``auto``: the ``flash_attn`` package when it is installed and the call fits it
  (CUDA, fp16/bf16, head dim <= 256, no bidirectional spans); else FlexAttention for
  packed documents on CUDA; else ``sdpa``.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``, which itself
  picks FlashAttention, cuDNN, memory-efficient or math from device, dtype and mask.
- ``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient``, ``sdpa_math``: SDPA held to
  one backend (for benchmarks and parity tests).
- ``flex``: FlexAttention with a block mask built from the same rule (compiled
  on CUDA; on CPU it runs unfused and forward only, for tests).
- ``flash_attn``: the ``flash_attn`` package; padded and packed rows go through
  its variable-length entry point.

The kernel is chosen once per stack forward (``plan_attention``) and logged at
INFO the first time each choice is made in a process.

Shape legend: B batch, L query length, S key length, H query heads, G key/value heads, D head dim, E model dim.
"""

import functools
import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from polytrain.config.registries import KERNELS
from polytrain.errors import PolytrainError
from polytrain.models.attention_mask import MaskRule
from polytrain.models.positions import apply_rotary

log = logging.getLogger(__name__)

FLASH_ATTN_MAX_HEAD_DIM = 256
"""Largest head dim the ``flash_attn`` kernels support."""


@dataclass(frozen=True)
class Varlen:
    """FlashAttention's variable-length form: int32 sequence offsets into the flattened tokens."""

    cu_q: Tensor
    cu_k: Tensor
    max_q: int
    max_k: int
    key_index: Tensor | None = None
    """Flat indices of the real keys, when padded keys must be dropped (cross-attention)."""


@dataclass(frozen=True)
class AttentionPlan:
    """A kernel and the mask in the form that kernel reads; built once per stack forward."""

    kernel: "Kernel"
    mask: Tensor | None = None
    """SDPA: (B, 1, L, S) bool or (B, H, L, S) additive float; None: every key visible."""
    is_causal: bool = False
    """SDPA / flash_attn: apply the kernel's own causal mask instead of ``mask``."""
    block_mask: Any = None
    """FlexAttention ``BlockMask``."""
    score_mod: Callable | None = None
    """FlexAttention score modifier (ALiBi)."""
    alibi_H: Tensor | None = None
    """flash_attn: fp32 ALiBi slopes."""
    varlen: Varlen | None = None

    def __call__(self, q_BLHD: Tensor, k_BSGD: Tensor, v_BSGD: Tensor, dropout_p: float) -> Tensor:
        return self.kernel.run(q_BLHD, k_BSGD, v_BSGD, self, dropout_p)


class Kernel(ABC):
    """One way to compute softmax attention; ``why_not`` says when it cannot take a call."""

    name = ""

    def why_not(self, rule: MaskRule, dtype: torch.dtype, device: torch.device, head_dim: int,
                dropout: float, alibi: bool) -> str | None:
        """Why this kernel cannot compute this call, or None when it can."""
        return None

    @abstractmethod
    def plan(self, rule: MaskRule, alibi_H: Tensor | None, dtype: torch.dtype) -> AttentionPlan:
        """The mask of ``rule`` (and ALiBi slopes) in the form this kernel reads."""

    @abstractmethod
    def run(self, q_BLHD: Tensor, k_BSGD: Tensor, v_BSGD: Tensor, plan: AttentionPlan, dropout_p: float) -> Tensor:
        """(B, L, H, D) attention output."""


SDPA_CUDA_ONLY = {SDPBackend.CUDNN_ATTENTION: "cuDNN", SDPBackend.EFFICIENT_ATTENTION: "memory-efficient"}
"""SDPA backends torch has on CUDA only (on CPU it has math and its own flash kernel)."""


class SDPA(Kernel):
    """``scaled_dot_product_attention``, optionally held to one backend."""

    def __init__(self, name: str, backend: SDPBackend | None):
        self.name, self.backend = name, backend

    def why_not(self, rule, dtype, device, head_dim, dropout, alibi):
        if self.backend in SDPA_CUDA_ONLY and device.type != "cuda":
            return f"torch has SDPA's {SDPA_CUDA_ONLY[self.backend]} backend on CUDA only"
        if self.backend == SDPBackend.FLASH_ATTENTION and device.type == "cuda":
            if dtype not in (torch.float16, torch.bfloat16):
                return f"SDPA's flash backend on CUDA needs fp16 or bf16, got {dtype}"
            if alibi or self.needs_mask(rule):
                return ("SDPA's flash backend on CUDA takes no mask: only rows without padding, documents, spans "
                        "or ALiBi (causal or not)")
        return None

    @staticmethod
    def needs_mask(rule: MaskRule) -> bool:
        """Whether SDPA needs an explicit mask for ``rule`` (rather than none or its own causal one)."""
        _, length, keys = rule.shape
        return not rule.is_plain() or (rule.causal and not (rule.offset == 0 and length == keys))

    def plan(self, rule: MaskRule, alibi_H: Tensor | None, dtype: torch.dtype) -> AttentionPlan:
        if alibi_H is not None:
            bias_HLS = -alibi_H.to(rule.key_valid_BS.device)[:, None, None] * rule.distance()
            return AttentionPlan(self, mask=bias_HLS.to(dtype).masked_fill(~rule.dense(), float("-inf")))
        if self.needs_mask(rule):
            return AttentionPlan(self, mask=rule.dense())
        return AttentionPlan(self, is_causal=rule.causal)

    def run(self, q_BLHD: Tensor, k_BSGD: Tensor, v_BSGD: Tensor, plan: AttentionPlan, dropout_p: float) -> Tensor:
        if self.backend is None:
            return self.sdpa(q_BLHD, k_BSGD, v_BSGD, plan, dropout_p)
        with sdpa_kernel(self.backend):
            return self.sdpa(q_BLHD, k_BSGD, v_BSGD, plan, dropout_p)

    @staticmethod
    def sdpa(q_BLHD: Tensor, k_BSGD: Tensor, v_BSGD: Tensor, plan: AttentionPlan, dropout_p: float) -> Tensor:
        y_BHLD = F.scaled_dot_product_attention(
            q_BLHD.transpose(1, 2), k_BSGD.transpose(1, 2), v_BSGD.transpose(1, 2), attn_mask=plan.mask,
            dropout_p=dropout_p, is_causal=plan.is_causal, enable_gqa=k_BSGD.shape[2] != q_BLHD.shape[2])
        return y_BHLD.transpose(1, 2)


SDPA_ANY = SDPA("sdpa", None)
SDPA_FLASH = SDPA("sdpa_flash", SDPBackend.FLASH_ATTENTION)
SDPA_CUDNN = SDPA("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)
SDPA_EFFICIENT = SDPA("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)
SDPA_MATH = SDPA("sdpa_math", SDPBackend.MATH)


@functools.cache
def flex_functions() -> tuple[Callable, Callable, Callable] | None:
    """(flex_attention compiled, flex_attention eager, create_block_mask), or None on a torch without them."""
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        return None
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention, dynamic=False), flex_attention, create_block_mask


class Flex(Kernel):
    """FlexAttention: the mask rule becomes a block mask, so fully masked tiles (other documents) are skipped."""

    name = "flex"

    def why_not(self, rule, dtype, device, head_dim, dropout, alibi):
        if flex_functions() is None:
            return "this torch has no torch.nn.attention.flex_attention"
        if dropout > 0:
            return "FlexAttention has no attention dropout"
        if device.type == "cpu" and torch.is_grad_enabled():
            return "FlexAttention has no backward on CPU"
        return None

    def plan(self, rule: MaskRule, alibi_H: Tensor | None, dtype: torch.dtype) -> AttentionPlan:
        create_block_mask = flex_functions()[2]
        batch, length, keys = rule.shape
        block_mask = create_block_mask(lambda b, h, q, k: rule.allowed(b, q, k), batch, None, length, keys,
                                       device=rule.key_valid_BS.device)
        score_mod = None
        if alibi_H is not None:
            slopes_H, offset = alibi_H.to(rule.key_valid_BS.device), rule.offset

            def score_mod(score, b, h, q, k):
                return score - slopes_H[h] * (q + offset - k).abs()
        return AttentionPlan(self, block_mask=block_mask, score_mod=score_mod)

    def run(self, q_BLHD: Tensor, k_BSGD: Tensor, v_BSGD: Tensor, plan: AttentionPlan, dropout_p: float) -> Tensor:
        compiled, eager, _ = flex_functions()
        flex = compiled if q_BLHD.is_cuda else eager  # compiled flex on CPU takes minutes to build; tests only
        y_BHLD = flex(q_BLHD.transpose(1, 2), k_BSGD.transpose(1, 2), v_BSGD.transpose(1, 2),
                      score_mod=plan.score_mod, block_mask=plan.block_mask,
                      enable_gqa=k_BSGD.shape[2] != q_BLHD.shape[2])
        return y_BHLD.transpose(1, 2)


FLEX = Flex()


@functools.cache
def flash_attn_module():
    """The ``flash_attn`` package, or None where it is not installed."""
    if importlib.util.find_spec("flash_attn") is None:
        return None
    import flash_attn

    return flash_attn


class FlashAttn(Kernel):
    """Tri Dao's FlashAttention-2 kernels (``flash_attn``): causal and ALiBi built in, packed rows via varlen."""

    name = "flash_attn"

    def why_not(self, rule, dtype, device, head_dim, dropout, alibi):
        if flash_attn_module() is None:
            return "the flash_attn package is not installed"
        if device.type != "cuda":
            return "flash_attn runs on CUDA only"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash_attn needs fp16 or bf16, got {dtype}"
        if head_dim > FLASH_ATTN_MAX_HEAD_DIM or head_dim % 8:
            return f"flash_attn needs a head dim <= {FLASH_ATTN_MAX_HEAD_DIM} divisible by 8, got {head_dim}"
        if rule.spans_BL is not None:
            return "flash_attn has no bidirectional spans (prefix-LM); use sdpa or flex"
        _, length, keys = rule.shape
        if rule.causal and rule.offset != keys - length:
            return "flash_attn aligns causal masks to the last key"
        if rule.offset and not rule.is_plain():
            return "flash_attn takes no padded keys while decoding with a cache"
        return None

    def plan(self, rule: MaskRule, alibi_H: Tensor | None, dtype: torch.dtype) -> AttentionPlan:
        alibi_H = None if alibi_H is None else alibi_H.to(rule.key_valid_BS.device, torch.float32)
        if rule.is_plain():
            return AttentionPlan(self, is_causal=rule.causal, alibi_H=alibi_H)
        if rule.self_attention:
            cu_seqlens, longest = rule.runs()
            return AttentionPlan(self, is_causal=rule.causal, alibi_H=alibi_H,
                                 varlen=Varlen(cu_seqlens, cu_seqlens, longest, longest))
        batch, length, _ = rule.shape
        device = rule.key_valid_BS.device
        keys_B = rule.key_valid_BS.sum(1)
        cu_k = torch.cat([keys_B.new_zeros(1), keys_B.cumsum(0)]).to(torch.int32)
        cu_q = (torch.arange(batch + 1, device=device) * length).to(torch.int32)
        key_index = rule.key_valid_BS.flatten().nonzero().flatten()
        return AttentionPlan(self, alibi_H=alibi_H,
                             varlen=Varlen(cu_q, cu_k, length, int(keys_B.max()), key_index))

    def run(self, q_BLHD: Tensor, k_BSGD: Tensor, v_BSGD: Tensor, plan: AttentionPlan, dropout_p: float) -> Tensor:
        flash_attn = flash_attn_module()
        if plan.varlen is None:
            return flash_attn.flash_attn_func(q_BLHD, k_BSGD, v_BSGD, dropout_p=dropout_p, causal=plan.is_causal,
                                              alibi_slopes=plan.alibi_H)
        batch, length, heads, head_dim = q_BLHD.shape
        k_ND, v_ND = k_BSGD.flatten(0, 1), v_BSGD.flatten(0, 1)
        if plan.varlen.key_index is not None:
            k_ND, v_ND = k_ND[plan.varlen.key_index], v_ND[plan.varlen.key_index]
        y = flash_attn.flash_attn_varlen_func(
            q_BLHD.flatten(0, 1), k_ND, v_ND, cu_seqlens_q=plan.varlen.cu_q, cu_seqlens_k=plan.varlen.cu_k,
            max_seqlen_q=plan.varlen.max_q, max_seqlen_k=plan.varlen.max_k, dropout_p=dropout_p,
            causal=plan.is_causal, alibi_slopes=plan.alibi_H)
        return y.view(batch, length, heads, head_dim)


FLASH_ATTN = FlashAttn()

AUTO_ORDER = ("flash_attn", "flex", "sdpa")
"""What ``auto`` tries, in order; flex only for packed documents on CUDA, where its block sparsity pays."""


def plan_attention(request: str, rule: MaskRule, dtype: torch.dtype, head_dim: int, dropout: float,
                   alibi_H: Tensor | None = None) -> AttentionPlan:
    """The kernel for this call (``request`` is a kernel name or ``auto``), with the mask in its form."""
    device = rule.key_valid_BS.device
    if request != "auto":
        kernel = KERNELS.get(request)
        reason = kernel.why_not(rule, dtype, device, head_dim, dropout, alibi_H is not None)
        if reason is not None:
            raise PolytrainError(f"attention kernel {request!r} cannot run this call: {reason}")
        announce(kernel.name, "as configured")
        return kernel.plan(rule, alibi_H, dtype)
    skipped = []
    for name in AUTO_ORDER:
        kernel = KERNELS.get(name)
        reason = kernel.why_not(rule, dtype, device, head_dim, dropout, alibi_H is not None)
        if name == "flex" and reason is None and (rule.query_docs_BL is None or device.type != "cuda"):
            reason = "used for packed documents on CUDA only"
        if reason is None:
            announce(name, "auto; " + "; ".join(skipped) if skipped else "auto")
            return kernel.plan(rule, alibi_H, dtype)
        skipped.append(f"not {name}: {reason}")
    raise AssertionError("sdpa takes every call")


@functools.cache
def announce(kernel: str, why: str) -> None:
    """Log each distinct kernel choice once per process."""
    log.info("attention kernel: %s (%s)", kernel, why)


class Attention(nn.Module):
    """Multi-head self-attention, or cross-attention to ``memory`` when built with ``cross=True``.

    ``n_kv_heads`` below ``n_heads`` gives grouped-query attention (1: multi-query);
    each key/value head serves ``n_heads / n_kv_heads`` query heads.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, bias: bool, dropout: float, cross: bool = False,
                 out_bias: bool | None = None):
        """``bias``: on the query/key/value projections; ``out_bias``: on the output projection (None: as ``bias``)."""
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.dropout, self.cross = dropout, cross
        q_width, kv_width = n_heads * self.head_dim, 2 * n_kv_heads * self.head_dim
        if cross:
            self.q = nn.Linear(dim, q_width, bias=bias)
            self.kv = nn.Linear(dim, kv_width, bias=bias)
        else:
            self.qkv = nn.Linear(dim, q_width + kv_width, bias=bias)
        self.out = nn.Linear(q_width, dim, bias=bias if out_bias is None else out_bias)

    def forward(self, x_BLE: Tensor, plan: AttentionPlan, rope: tuple[Tensor, Tensor] | None = None,
                memory_BSE: Tensor | None = None, cache=None) -> Tensor:
        """``cache`` (a ``LayerCache``) holds earlier keys and values while decoding."""
        batch, length, _ = x_BLE.shape
        heads, kv_heads, head_dim = self.n_heads, self.n_kv_heads, self.head_dim
        if self.cross:
            q_BLHD = self.q(x_BLE).view(batch, length, heads, head_dim)
            if cache is not None and cache.memory is not None:
                k_BSGD, v_BSGD = cache.memory
            else:
                k_BSGD, v_BSGD = self.kv(memory_BSE).view(batch, -1, 2 * kv_heads, head_dim).chunk(2, dim=2)
                if cache is not None:
                    cache.memory = (k_BSGD, v_BSGD)
        else:
            qkv = self.qkv(x_BLE).view(batch, length, heads + 2 * kv_heads, head_dim)
            q_BLHD, k_BSGD, v_BSGD = qkv.split([heads, kv_heads, kv_heads], dim=2)
            if rope is not None:
                q_BLHD, k_BSGD = apply_rotary(q_BLHD, *rope), apply_rotary(k_BSGD, *rope)
            if cache is not None:
                k_BSGD, v_BSGD = cache.append(k_BSGD, v_BSGD)
        y_BLHD = plan(q_BLHD, k_BSGD, v_BSGD, self.dropout if self.training else 0.0)
        return self.out(y_BLHD.flatten(2))
