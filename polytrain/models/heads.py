"""Heads: how a task drives the shared backbone. Every head has the same entry points.

``head.loss(model, batch)`` for training; ``head(model, batch) -> logits`` for
evaluation; ``head.prepare(batch, generator)`` turns a data batch into what the
head scores (only masked_lm changes it: it masks tokens); the text decoders
also have ``head.generate(...)``.

- decoder_only: causal LM over ``batch.inputs``; with ``batch.source`` set, the
  source is a bidirectional prefix (prefix-LM) and only the text is scored.
- encoder_decoder: the encoder reads ``batch.source`` (any modality), the
  decoder reads the text with cross-attention; teacher forcing.
- encoder_classifier: the encoder reads ``batch.inputs`` (any modality);
  logits (B, classes) from the [CLS] token or the mean of the real tokens.
- masked_lm: BERT-style masked modeling on the text ``batch.inputs``.

Shape legend: B batch, T text length, S source length, E model dim, V vocabulary, C classes.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytrain.models.cache import KVCache
from polytrain.models.config import HEAD_KINDS, HEADS, NORMS, DecodingConfig, HeadKind
from polytrain.models.embed import Embedded
from polytrain.models.generation import STRATEGIES
from polytrain.models.mlm_corruption import mask_tokens
from polytrain.tokens import IGNORE_INDEX, EmbedSpec, Segment, TaskBatch

if TYPE_CHECKING:
    from polytrain.models.config import ModelConfig
    from polytrain.models.model import PolyModel

def token_loss(logits_XV: Tensor, labels_X: Tensor, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy in fp32 over positions whose label is not ``IGNORE_INDEX``.

    ``logits_XV`` is (..., V) with labels of shape (...): (B, T, V) with (B, T), or (B, C) with (B,).
    """
    return F.cross_entropy(logits_XV.float().flatten(0, -2), labels_X.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction, label_smoothing=label_smoothing)


class Head(nn.Module):
    kind: HeadKind
    """What the head needs (encoder, decoder, text output) and whether it generates; a plugin head sets its own."""

    def __init__(self, cfg: ModelConfig, specs: dict[str, EmbedSpec]):
        super().__init__()
        self.label_smoothing = cfg.heads.label_smoothing

    def prepare(self, batch: TaskBatch, generator: torch.Generator | None = None) -> TaskBatch:
        """The batch this head scores; unchanged except where a head corrupts its input (masked_lm)."""
        return batch

    def loss(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        """The scalar training loss: mean cross-entropy over labelled positions (or samples)."""
        batch = self.prepare(batch)
        return token_loss(self(model, batch), batch.labels, label_smoothing=self.label_smoothing)

    @abstractmethod
    def forward(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        """Logits: (B, T, V) for text heads, (B, C) for the classifier."""


class TextDecoderHead(Head):
    """A causal decoder over text that can continue a prompt: greedy, sampling, beam search, with a KV cache."""

    @torch.no_grad()
    def generate(self, model: PolyModel, prompt_BP: Tensor, source: Segment | None, max_new_tokens: int, eos_id: int,
                 decoding: DecodingConfig | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Continuations (B, <= max_new_tokens) of equal-length prompts; rows pad with eos once done."""
        decoding = decoding or DecodingConfig()
        capacity = prompt_BP.shape[1] + max_new_tokens

        def start(rows_per_prompt: int) -> DecoderSession:
            return self.session(model, source, rows_per_prompt, capacity)

        return STRATEGIES.get(decoding.strategy)(start, prompt_BP, max_new_tokens, eos_id, decoding, generator)

    @abstractmethod
    def session(self, model: PolyModel, source: Segment | None, rows_per_prompt: int,
                text_capacity: int) -> DecoderSession:
        """An incremental decoder over ``source``, each prompt's context repeated ``rows_per_prompt`` times."""


class DecoderSession:
    """The decoder stack with its KV cache; the prefix (if any) goes in with the first ``feed``."""

    def __init__(self, model: PolyModel, capacity: int, prefix: Embedded | None = None,
                 memory_BSE: Tensor | None = None, memory_valid_BS: Tensor | None = None):
        self.model, self.prefix = model, prefix
        self.memory_BSE, self.memory_valid_BS = memory_BSE, memory_valid_BS
        self.cache = KVCache(len(model.backbone.decoder.blocks), capacity)
        self.text_length = 0

    def feed(self, ids_BL: Tensor) -> Tensor:
        seq = self.model.embed(text_segment(ids_BL, start=self.text_length), decoder=True)
        prefix = 0
        if self.prefix is not None:
            seq, prefix, self.prefix = self.prefix.then(seq), self.prefix.length, None
        h_BLE = self.model.backbone.decode(seq, self.memory_BSE, self.memory_valid_BS, prefix, self.cache)
        self.text_length += ids_BL.shape[1]
        return self.model.lm_logits(h_BLE[:, -1])

    def reorder(self, rows_B: Tensor) -> None:
        self.cache.reorder(rows_B)
        if self.memory_BSE is not None:
            self.memory_BSE, self.memory_valid_BS = self.memory_BSE[rows_B], self.memory_valid_BS[rows_B]


@HEADS.register("decoder_only")
class DecoderOnlyHead(TextDecoderHead):
    """Causal LM over text, no encoder; an image/audio ``batch.source`` becomes a bidirectional prefix."""

    kind = HEAD_KINDS["decoder_only"]

    def forward(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        text = model.embed(batch.inputs, decoder=True)
        if batch.source is None:
            return model.lm_logits(model.backbone.decode(text))
        prefix = model.embed(batch.source)
        h_BLE = model.backbone.decode(prefix.then(text), prefix=prefix.length)
        return model.lm_logits(h_BLE[:, prefix.length:])

    def session(self, model, source, rows_per_prompt, text_capacity):
        if source is None:
            return DecoderSession(model, text_capacity)
        prefix = repeat_rows(model.embed(source), rows_per_prompt)
        return DecoderSession(model, text_capacity + prefix.length, prefix=prefix)


@HEADS.register("encoder_decoder")
class EncoderDecoderHead(TextDecoderHead):
    """Encoder over the source (any modality), causal decoder over text with cross-attention."""

    kind = HEAD_KINDS["encoder_decoder"]

    def memory(self, model: PolyModel, source: Segment | None) -> tuple[Tensor, Tensor]:
        """The encoder's view of the source and which of it is real: (B, S, E), (B, S)."""
        if source is None:
            raise ValueError("an encoder-decoder task needs a source segment in every batch")
        embedded = model.embed(source)
        return model.backbone.encode(embedded), embedded.valid_BL

    def forward(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        memory_BSE, memory_valid_BS = self.memory(model, batch.source)
        text = model.embed(batch.inputs, decoder=True)
        return model.lm_logits(model.backbone.decode(text, memory_BSE, memory_valid_BS))

    def session(self, model, source, rows_per_prompt, text_capacity):
        memory_BSE, memory_valid_BS = self.memory(model, source)  # encoded once, for every step and beam
        memory_BSE = memory_BSE.repeat_interleave(rows_per_prompt, dim=0)
        memory_valid_BS = memory_valid_BS.repeat_interleave(rows_per_prompt, dim=0)
        return DecoderSession(model, text_capacity, memory_BSE=memory_BSE, memory_valid_BS=memory_valid_BS)


@HEADS.register("encoder_classifier")
class EncoderClassifierHead(Head):
    """Bidirectional encoder over ``batch.inputs`` (any modality), pooled, then a linear map to class logits."""

    kind = HEAD_KINDS["encoder_classifier"]

    def __init__(self, cfg: ModelConfig, specs: dict[str, EmbedSpec]):
        super().__init__(cfg, specs)
        self.pooling = cfg.heads.classifier.pooling
        self.pooler = nn.Linear(cfg.backbone.dim, cfg.backbone.dim) if cfg.heads.classifier.pooler else None
        self.proj = nn.Linear(cfg.backbone.dim, cfg.heads.classifier.classes)

    def forward(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        embedded = model.embed(batch.inputs)
        h_BLE = model.backbone.encode(embedded)
        if self.pooling == "cls":
            pooled_BE = h_BLE[:, 0]
        else:
            weights_BL1 = embedded.valid_BL[..., None].to(h_BLE.dtype)
            pooled_BE = (h_BLE * weights_BL1).sum(1) / weights_BL1.sum(1)
        if self.pooler is not None:
            pooled_BE = torch.tanh(self.pooler(pooled_BE))
        return self.proj(pooled_BE)


@HEADS.register("masked_lm")
class MaskedLMHead(Head):
    """BERT's masked LM: the encoder reads corrupted text; dense + GELU + norm, then the (tied) vocabulary map."""

    kind = HEAD_KINDS["masked_lm"]

    def __init__(self, cfg: ModelConfig, specs: dict[str, EmbedSpec]):
        super().__init__(cfg, specs)
        self.cfg, self.vocab_size = cfg.heads.masked_lm, specs["text"].input_dim
        self.dense = nn.Linear(cfg.backbone.dim, cfg.backbone.dim)
        self.norm = NORMS.get(cfg.backbone.norm)(cfg.backbone.dim, cfg.backbone.norm_eps)

    def prepare(self, batch: TaskBatch, generator: torch.Generator | None = None) -> TaskBatch:
        """Mask ``batch.inputs``; labels become the original ids at the selected positions."""
        ids_BT, labels_BT = mask_tokens(batch.inputs.values, batch.inputs.mask, self.cfg.probability,
                                        self.cfg.mask_id, self.cfg.first_regular_id, self.vocab_size, generator)
        return replace(batch, inputs=replace(batch.inputs, values=ids_BT), labels=labels_BT)

    def forward(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        h_BTE = model.backbone.encode(model.embed(batch.inputs))
        return model.lm_logits(self.norm(F.gelu(self.dense(h_BTE))))


def repeat_rows(e: Embedded, times: int) -> Embedded:
    """Each row of ``e`` repeated ``times`` times in place (beam search: one copy per beam)."""
    if times == 1:
        return e
    rep = lambda t: None if t is None else t.repeat_interleave(times, dim=0)  # noqa: E731
    return Embedded(rep(e.x_BLE), rep(e.valid_BL), rep(e.documents_BL),
                    None if e.rope is None else (rep(e.rope[0]), rep(e.rope[1])))


def text_segment(ids_BT: Tensor, start: int = 0) -> Segment:
    """Unpadded ids as a text Segment at positions start, start+1, ... on row 0."""
    batch, length = ids_BT.shape
    cols_BT = torch.arange(start, start + length, device=ids_BT.device).expand(batch, length)
    positions_BT2 = torch.stack([torch.zeros_like(cols_BT), cols_BT], dim=-1)
    return Segment(ids_BT, positions_BT2, torch.ones_like(ids_BT, dtype=torch.bool), "text")
