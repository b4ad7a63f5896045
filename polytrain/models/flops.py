"""Model FLOPs of training a decoder-only LM, per token, for MFU (model FLOPs utilization).

Counted as PaLM does (Chowdhery et al. 2022, appendix B): only matrix
multiplies, two FLOPs per multiply-add, the backward pass twice the forward,
and attention over the full ``seq_len`` x ``seq_len`` square whatever the mask
(so the figure does not depend on the kernel's causal tile skipping).  Per
token of a ``seq_len`` sequence:

    6 * (every decoder weight matrix + the output projection)  +  12 * layers * dim * seq_len

Recomputation (activation checkpointing) is not counted: it is not model work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from polytrain.errors import ConfigError

if TYPE_CHECKING:
    from polytrain.models.model import PolyModel

MULTIPLY_ADD = 2
"""FLOPs per multiply-add."""
FORWARD_AND_BACKWARD = 3
"""The backward pass multiplies by the weights and by the activations: twice the forward."""


def train_flops_per_token(model: PolyModel, seq_len: int) -> int:
    """Training FLOPs per token of a decoder-only ``PolyModel`` fed ``seq_len``-token rows."""
    cfg = model.cfg.backbone
    if cfg.encoder_layers or not cfg.decoder_layers:
        raise ConfigError("model.backbone.encoder_layers", cfg.encoder_layers,
                          "FLOPs per token are counted for decoder-only models (encoder_layers=0, decoder_layers>0)")
    dim, layers = cfg.dim, cfg.decoder_layers
    linears = (m for m in model.backbone.decoder.modules() if isinstance(m, nn.Linear))
    weights = sum(m.in_features * m.out_features for m in linears)
    vocab = model.embedders["text"].table.num_embeddings
    output = vocab * dim  # the separate lm_head or the tied table: one (V, E) matrix either way
    attention = 2 * dim * seq_len * layers  # q k^T and the weighted sum of v, over every key
    return FORWARD_AND_BACKWARD * MULTIPLY_ADD * (weights + output + attention)
