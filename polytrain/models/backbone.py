"""The shared Transformer: blocks stacked into an encoder and a decoder.

One ``Block`` serves both stacks: the encoder's are bidirectional, the
decoder's causal, with cross-attention to the encoder output when the
backbone has an encoder.  Pre-norm (GPT-2, ViT) or post-norm (the original
Transformer, BERT, BART); LayerNorm or RMSNorm; GELU or SwiGLU MLP.  A stack
builds its attention masks once per forward and hands them to every block.  Under sequence parallelism a stack
computes its ``SequenceShard``'s slice of the tokens, with the masks of the whole sequence (``sequence_shard.py``).

Shape legend: B batch, L length, S memory length, E model dim.
"""

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from polytrain.config.model import BackboneConfig
from polytrain.config.registries import MLPS, NORMS, POSITIONS
from polytrain.models.attention import Attention, AttentionPlan, plan_attention
from polytrain.models.attention_mask import MaskRule
from polytrain.models.cache import KVCache, LayerCache
from polytrain.models.embed import Embedded
from polytrain.models.layers import DropPath, LayerScale
from polytrain.models.positions import alibi_slopes
from polytrain.models.sequence_shard import WHOLE, SequenceShard


class Block(nn.Module):
    """Self-attention [+ cross-attention to ``memory``] + MLP, each a residual branch, pre- or post-norm."""

    def __init__(self, cfg: BackboneConfig, cross_attention: bool, drop_path: float = 0.0):
        super().__init__()
        norm, dim = NORMS.get(cfg.norm), cfg.dim
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = norm(dim, cfg.norm_eps)
        qkv_bias, out_bias, mlp_bias = cfg.biases
        self.attn = Attention(dim, cfg.n_heads, cfg.kv_heads, qkv_bias, cfg.dropout, out_bias=out_bias)
        self.cross_norm = norm(dim, cfg.norm_eps) if cross_attention else None
        self.cross = (Attention(dim, cfg.n_heads, cfg.kv_heads, qkv_bias, cfg.dropout, cross=True, out_bias=out_bias)
                      if cross_attention else None)
        self.mlp_norm = norm(dim, cfg.norm_eps)
        self.mlp = MLPS.get(cfg.mlp)(dim, cfg.mlp_hidden, mlp_bias, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)
        self.attn_scale = LayerScale(dim) if cfg.layer_scale else None
        self.mlp_scale = LayerScale(dim) if cfg.layer_scale else None

    def forward(self, x_BLE: Tensor, plan: AttentionPlan, rope: tuple[Tensor, Tensor] | None = None,
                memory_BSE: Tensor | None = None, memory_plan: AttentionPlan | None = None,
                cache: LayerCache | None = None) -> Tensor:
        x_BLE = self.residual(x_BLE, self.attn_norm, lambda h: self.drop(self.attn(h, plan, rope, cache=cache)),
                              self.attn_scale)
        if self.cross is not None and memory_BSE is not None:
            x_BLE = self.residual(x_BLE, self.cross_norm,
                                  lambda h: self.drop(self.cross(h, memory_plan, memory_BSE=memory_BSE, cache=cache)))
        return self.residual(x_BLE, self.mlp_norm, self.mlp, self.mlp_scale)

    def residual(self, x_BLE: Tensor, norm: nn.Module, branch, scale: nn.Module | None = None) -> Tensor:
        """``scale``: the branch's LayerScale, if any."""
        if self.pre_norm:
            return x_BLE + self.drop_path(scaled(branch(norm(x_BLE)), scale))
        return norm(x_BLE + self.drop_path(scaled(branch(x_BLE), scale)))


def scaled(branch_BLE: Tensor, scale: nn.Module | None) -> Tensor:
    return branch_BLE if scale is None else scale(branch_BLE)


class Stack(nn.Module):
    """``n_layers`` blocks, the input norm/dropout, the final norm of a pre-norm stack, and the masks."""

    sequence: SequenceShard = WHOLE
    """What part of each sequence a training forward computes (``PolyModel.shard_sequences`` sets it)."""

    def __init__(self, cfg: BackboneConfig, n_layers: int, causal: bool, cross_attention: bool,
                 final_norm: bool = True):
        """``final_norm``: a pre-norm stack normalizes its output (a tower whose features are read un-normalized
        has none)."""
        super().__init__()
        self.cfg, self.causal = cfg, causal
        norm = NORMS.get(cfg.norm)
        self.input_norm = norm(cfg.dim, cfg.norm_eps) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(n_layers - 1, 1) for i in range(n_layers)]
        self.blocks = nn.ModuleList(Block(cfg, cross_attention, rate) for rate in rates)
        self.norm = norm(cfg.dim, cfg.norm_eps) if cfg.norm_position == "pre" and final_norm else None
        slopes = alibi_slopes(cfg.n_heads) if POSITIONS.get(cfg.position).alibi else None
        self.register_buffer("alibi_H", slopes, persistent=False)
        if cfg.compile:
            for block in self.blocks:
                block.compile()

    def forward(self, seq: Embedded, memory_BSE: Tensor | None = None, memory_valid_BS: Tensor | None = None,
                cache: KVCache | None = None, memory_docs_BS: Tensor | None = None) -> Tensor:
        """``cache``: decode incrementally; ``memory_docs_BS``: the packed documents of the memory (cross-attention
        keeps each decoder document to its own).

        Sharded (training): ``seq`` is whole, ``memory_BSE`` this device's slice of the memory, and the output is
        this device's slice (B, L/size, E)."""
        shard = self.sequence if self.training and cache is None else WHOLE
        x_BLE = shard.split(seq.x_BLE)
        x_BLE = x_BLE if self.input_norm is None else self.input_norm(x_BLE)
        x_BLE = self.drop(x_BLE)
        plan, memory_plan = self.plans(seq, x_BLE, memory_valid_BS if memory_BSE is not None else None, cache,
                                       memory_docs_BS, shard)
        rope = shard.split_rope(seq.rope)
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            if self.cfg.checkpointing and self.training and torch.is_grad_enabled():
                x_BLE = checkpoint(block, x_BLE, plan, rope, memory_BSE, memory_plan, layer_cache,
                                   use_reentrant=False)
            else:
                x_BLE = block(x_BLE, plan, rope, memory_BSE, memory_plan, layer_cache)
        if cache is not None:
            cache.advance(seq.length)
        return x_BLE if self.norm is None else self.norm(x_BLE)

    def plans(self, seq: Embedded, x_BLE: Tensor, memory_valid_BS: Tensor | None, cache: KVCache | None,
              memory_docs_BS: Tensor | None, shard: SequenceShard) -> tuple[AttentionPlan, AttentionPlan | None]:
        """The self-attention and cross-attention plans every block of this forward shares: the masks of the whole
        sequence (and memory), for the heads this device computes, with ``shard``'s exchanges around them."""
        dtype, cfg = compute_dtype(x_BLE), self.cfg
        dropout = cfg.dropout if self.training else 0.0
        if cache is None:
            spans = seq.spans_BL if self.causal else None  # an encoder sees everything anyway
            rule = MaskRule(seq.valid_BL, seq.valid_BL, self.causal, spans, 0, seq.documents_BL, seq.documents_BL)
        else:
            assert seq.documents_BL is None, "incremental decoding takes one document per row"
            offset = cache.length
            spans = seq.spans_BL if offset == 0 else None  # later tokens are text, after every span
            rule = MaskRule(cache.extend(seq.valid_BL), seq.valid_BL, self.causal, spans, offset)
        plan = plan_attention(cfg.attention, rule, dtype, cfg.head_dim, dropout, shard.heads(self.alibi_H))
        if memory_valid_BS is None:
            return shard.attention(plan), None
        cross_rule = MaskRule(memory_valid_BS, seq.valid_BL, self_attention=False, query_docs_BL=seq.documents_BL,
                              key_docs_BS=memory_docs_BS)
        return shard.attention(plan), shard.attention(plan_attention(cfg.attention, cross_rule, dtype, cfg.head_dim,
                                                                     dropout))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype attention will see: autocast's when it is on, else the activations'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class Backbone(nn.Module):
    """An encoder stack (absent when ``encoder_layers`` is 0) and a decoder stack (absent when ``decoder_layers`` is 0).

    The encoder's blocks may have settings of their own (``BackboneConfig.encoder``); when its width differs,
    ``memory_proj`` maps its output to the decoder's width for cross-attention.  Without an encoder stack, a
    head that reads one reads the embedders' output instead (a tower's: Whisper's encoder is its audio tower).
    """

    def __init__(self, cfg: BackboneConfig, cross_attention: bool = False):
        """``cross_attention``: the decoder cross-attends even without an encoder stack (to a tower's output)."""
        super().__init__()
        with_encoder = cfg.encoder_layers > 0
        encoder = cfg.encoder_stack
        self.encoder = Stack(encoder, cfg.encoder_layers, causal=False, cross_attention=False) if with_encoder else None
        self.decoder = (Stack(cfg, cfg.decoder_layers, causal=True, cross_attention=with_encoder or cross_attention)
                        if cfg.decoder_layers else None)
        bridged = self.encoder is not None and self.decoder is not None and encoder.dim != cfg.dim
        self.memory_proj = nn.Linear(encoder.dim, cfg.dim) if bridged else None

    def encode(self, seq: Embedded) -> Tensor:
        """Bidirectional: (B, S, E_enc), the encoder's width; without an encoder stack, the embedded vectors."""
        return seq.x_BLE if self.encoder is None else self.encoder(seq)

    def memory(self, seq: Embedded) -> Tensor:
        """What the decoder cross-attends to: the encoder's output at the decoder's width, (B, S, E)."""
        memory_BSE = self.encode(seq)
        return memory_BSE if self.memory_proj is None else self.memory_proj(memory_BSE)

    def decode(self, seq: Embedded, memory_BSE: Tensor | None = None, memory_valid_BS: Tensor | None = None,
               cache: KVCache | None = None, memory_docs_BS: Tensor | None = None) -> Tensor:
        """Causal over ``seq`` (bidirectional within its spans), cross-attending to ``memory``."""
        return self.decoder(seq, memory_BSE, memory_valid_BS, cache, memory_docs_BS)
