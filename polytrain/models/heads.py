"""Heads: how a task drives the shared backbone. Every head has the same entry points.

``head.loss(model, batch)`` for training; ``head(model, batch) -> logits`` for
evaluation; the text decoders also have ``head.generate(...)``.

- decoder_only: causal LM over ``batch.inputs``, a text sequence whose non-text
  spans (images, audio) may attend bidirectionally within themselves (prefix-LM);
  only the labelled (scored) text carries the loss.
- encoder_decoder: the encoder reads ``batch.source`` (any modality), the
  decoder reads the text with cross-attention; teacher forcing.
- encoder_classifier: the encoder reads ``batch.inputs`` (any modality);
  logits (B, classes) from the [CLS] token or the mean of the real tokens.
- masked_lm: BERT-style masked modeling on the text ``batch.inputs`` (masked by the data pipeline).

Shape legend: B batch, T text length, S source length, E model dim, V vocabulary, C classes, X any leading dims
(the labelled positions, in training).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytrain.config.model import HEAD_KINDS, DecodingConfig, HeadKind
from polytrain.config.registries import NORMS, STRATEGIES
from polytrain.models.cache import KVCache
from polytrain.models.embed import Embedded
from polytrain.tokens import IGNORE_INDEX, EmbedSpec, Segment, TaskBatch

if TYPE_CHECKING:
    from polytrain.config.model import ModelConfig
    from polytrain.models.model import PolyModel

def token_loss(logits_XV: Tensor, labels_X: Tensor, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy in fp32 over positions whose label is not ``IGNORE_INDEX``.

    ``logits_XV`` is (..., V) with labels of shape (...): (B, T, V) with (B, T), or (B, C) with (B,).  The mean
    of no position is 0 (a sequence shard may hold none), still a function of the logits, so its backward runs.
    """
    summed = F.cross_entropy(logits_XV.float().flatten(0, -2), labels_X.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="sum" if reduction == "mean" else reduction, label_smoothing=label_smoothing)
    if reduction != "mean":
        return summed
    return summed / (labels_X != IGNORE_INDEX).sum().clamp(min=1)


class Head(nn.Module):
    kind: HeadKind
    """What the head needs (encoder, decoder, text output) and whether it generates; a plugin head sets its own."""

    def __init__(self, cfg: ModelConfig, specs: dict[str, EmbedSpec]):
        super().__init__()
        self.label_smoothing = cfg.heads.label_smoothing

    def loss(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        """The scalar training loss: mean cross-entropy over labelled positions (or samples); sharded, over those of
        this device's slice of the sequences."""
        return token_loss(self(model, batch), model.shard.labels(batch.labels), label_smoothing=self.label_smoothing)

    @abstractmethod
    def forward(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        """Logits: (B, T, V) for text heads, (B, C) for the classifier."""


class VocabularyHead(Head):
    """A head that scores text: hidden states (``features``), then ``predict`` maps them onto the vocabulary.

    Training predicts only the labelled positions (an image's slots, a prompt, padding and a masked LM's unmasked
    tokens carry no loss, so their (V)-wide logits would be computed for nothing); evaluation and generation
    read the logits of every position."""

    def forward(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        return self.predict(model, self.features(model, batch))

    def loss(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        labels = model.shard.labels(batch.labels)
        scored = labels != IGNORE_INDEX
        return token_loss(self.predict(model, self.features(model, batch)[scored]), labels[scored],
                          label_smoothing=self.label_smoothing)

    @abstractmethod
    def features(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        """The hidden states (B, T, E) the logits are predicted from (this device's slice, sharded)."""

    def predict(self, model: PolyModel, h_XE: Tensor) -> Tensor:
        """Logits (..., V) of hidden states (..., E)."""
        return model.lm_logits(h_XE)


class TextDecoderHead(VocabularyHead):
    """A causal decoder over text that can continue a prompt: greedy, sampling, beam search, with a KV cache."""

    @torch.no_grad()
    def generate(self, model: PolyModel, prompt: Tensor | Segment, source: Segment | None, max_new_tokens: int,
                 eos_id: int, decoding: DecodingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continuations (B, <= max_new_tokens) of the prompts; rows pad with eos once done.

        ``prompt``: ids (B, P) of equal length, or a text Segment (with spans) whose rows end in their last
        token (left-padded): everything before it is the context, encoded once (spans bidirectionally).
        """
        decoding = decoding or DecodingConfig()
        prompt = text_segment(prompt) if isinstance(prompt, Tensor) else prompt
        context = drop_last_column(prompt) if prompt.values.shape[1] > 1 else None
        capacity = prompt.values.shape[1] + max_new_tokens
        next_position_B = prompt.positions[:, -1, 1]

        def start(rows_per_prompt: int) -> DecoderSession:
            prefix = None
            if context is not None:
                prefix = repeat_rows(model.embed(context, decoder=True, bidirectional_spans=True), rows_per_prompt)
            return self.session(model, source, rows_per_prompt, capacity, prefix,
                                next_position_B.repeat_interleave(rows_per_prompt))

        return STRATEGIES.get(decoding.strategy)(start, prompt.values[:, -1:], max_new_tokens, eos_id, decoding,
                                                 generator)

    @abstractmethod
    def session(self, model: PolyModel, source: Segment | None, rows_per_prompt: int, capacity: int,
                prefix: Embedded | None, positions_B: Tensor) -> DecoderSession:
        """An incremental decoder over ``source`` (each prompt's repeated ``rows_per_prompt`` times), the prompt's
        context ``prefix`` fed first, the next text token at ``positions_B``."""


class DecoderSession:
    """The decoder stack with its KV cache; the prefix (if any) goes in with the first ``feed``."""

    def __init__(self, model: PolyModel, capacity: int, prefix: Embedded | None, positions_B: Tensor,
                 memory_BSE: Tensor | None = None, memory_valid_BS: Tensor | None = None):
        self.model, self.prefix, self.positions_B = model, prefix, positions_B
        self.memory_BSE, self.memory_valid_BS = memory_BSE, memory_valid_BS
        self.cache = KVCache(len(model.backbone.decoder.blocks), capacity)

    def feed(self, ids_BL: Tensor) -> Tensor:
        seq = self.model.embed(text_segment(ids_BL, start=self.positions_B), decoder=True)
        if self.prefix is not None:
            seq, self.prefix = self.prefix.then(seq), None
        h_BLE = self.model.backbone.decode(seq, self.memory_BSE, self.memory_valid_BS, self.cache)
        self.positions_B = self.positions_B + ids_BL.shape[1]
        return self.model.lm_logits(h_BLE[:, -1])

    def reorder(self, rows_B: Tensor) -> None:
        self.cache.reorder(rows_B)
        self.positions_B = self.positions_B[rows_B]
        if self.memory_BSE is not None:
            self.memory_BSE, self.memory_valid_BS = self.memory_BSE[rows_B], self.memory_valid_BS[rows_B]


class DecoderOnlyHead(TextDecoderHead):
    """Causal LM over one sequence, no encoder: text, and non-text spans inside it (bidirectional within each
    span when the batch says so: prefix-LM)."""

    kind = HEAD_KINDS["decoder_only"]

    def features(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        seq = model.embed(batch.inputs, decoder=True, bidirectional_spans=batch.bidirectional_spans)
        return model.backbone.decode(seq)

    def session(self, model, source, rows_per_prompt, capacity, prefix, positions_B):
        return DecoderSession(model, capacity, prefix, positions_B)


class EncoderDecoderHead(TextDecoderHead):
    """Encoder over the source (any modality), causal decoder over text with cross-attention."""

    kind = HEAD_KINDS["encoder_decoder"]

    def memory(self, model: PolyModel, source: Segment | None) -> tuple[Tensor, Embedded]:
        """The encoder's view of the source (B, S, E), and the embedded source (what of it is real, its documents).

        Sharded, the memory is this device's slice of it and stays split: the decoder's cross-attention exchanges
        it as self-attention exchanges its own tokens, so no device holds the whole memory's keys and values
        (the long side of a speech or image input)."""
        if source is None:
            raise ValueError("an encoder-decoder task needs a source segment in every batch")
        embedded = model.embed(source)
        return model.backbone.memory(embedded), embedded

    def features(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        memory_BSE, source = self.memory(model, batch.source)
        text = model.embed(batch.inputs, decoder=True)
        return model.backbone.decode(text, memory_BSE, source.valid_BL, memory_docs_BS=source.documents_BL)

    def session(self, model, source, rows_per_prompt, capacity, prefix, positions_B):
        memory_BSE, embedded = self.memory(model, source)  # encoded once, for every step and beam
        memory_valid_BS = embedded.valid_BL
        memory_BSE = memory_BSE.repeat_interleave(rows_per_prompt, dim=0)
        memory_valid_BS = memory_valid_BS.repeat_interleave(rows_per_prompt, dim=0)
        return DecoderSession(model, capacity, prefix, positions_B, memory_BSE, memory_valid_BS)


class EncoderClassifierHead(Head):
    """Bidirectional encoder over ``batch.inputs`` (any modality), pooled, then a linear map to class logits."""

    kind = HEAD_KINDS["encoder_classifier"]

    def __init__(self, cfg: ModelConfig, specs: dict[str, EmbedSpec]):
        super().__init__(cfg, specs)
        self.pooling = cfg.heads.classifier.pooling
        dim = cfg.backbone.encoder_stack.dim  # it reads the encoder's output
        self.pooler = nn.Linear(dim, dim) if cfg.heads.classifier.pooler else None
        self.proj = nn.Linear(dim, cfg.heads.classifier.classes)

    def forward(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        embedded = model.embed(batch.inputs)
        h_BLE = model.shard.gather(model.backbone.encode(embedded))  # pooled over the whole sequence
        if self.pooling == "cls":
            pooled_BE = h_BLE[:, 0]
        else:
            weights_BL1 = embedded.valid_BL[..., None].to(h_BLE.dtype)
            pooled_BE = (h_BLE * weights_BL1).sum(1) / weights_BL1.sum(1)
        if self.pooler is not None:
            pooled_BE = torch.tanh(self.pooler(pooled_BE))
        return self.proj(pooled_BE)


class MaskedLMHead(VocabularyHead):
    """BERT's masked LM: the encoder reads text the data pipeline corrupted (``mlm_corruption``); dense + GELU +
    norm, then the (tied) vocabulary map predicts the originals at the labelled positions."""

    kind = HEAD_KINDS["masked_lm"]

    def __init__(self, cfg: ModelConfig, specs: dict[str, EmbedSpec]):
        super().__init__(cfg, specs)
        self.dense = nn.Linear(cfg.backbone.dim, cfg.backbone.dim)
        self.norm = NORMS.get(cfg.backbone.norm)(cfg.backbone.dim, cfg.backbone.norm_eps)

    def features(self, model: PolyModel, batch: TaskBatch) -> Tensor:
        return model.backbone.encode(model.embed(batch.inputs))

    def predict(self, model: PolyModel, h_XE: Tensor) -> Tensor:
        return model.lm_logits(self.norm(F.gelu(self.dense(h_XE))))


def repeat_rows(e: Embedded, times: int) -> Embedded:
    """Each row of ``e`` repeated ``times`` times in place (beam search: one copy per beam)."""
    if times == 1:
        return e
    rep = lambda t: None if t is None else t.repeat_interleave(times, dim=0)  # noqa: E731
    return Embedded(rep(e.x_BLE), rep(e.valid_BL), rep(e.documents_BL),
                    None if e.rope is None else (rep(e.rope[0]), rep(e.rope[1])), rep(e.spans_BL))


def drop_last_column(segment: Segment) -> Segment:
    """A batch of prompts without their last token (spans never sit there: a closing marker would)."""
    return Segment(segment.values[:, :-1], segment.positions[:, :-1], segment.mask[:, :-1], segment.modality,
                   None if segment.documents is None else segment.documents[:, :-1], segment.spans)


def text_segment(ids_BT: Tensor, start: int | Tensor = 0) -> Segment:
    """Unpadded ids as a text Segment at positions start, start+1, ... on row 0 (``start``: one for all rows, or
    (B,) one per row)."""
    batch, length = ids_BT.shape
    start_B1 = torch.as_tensor(start, device=ids_BT.device).reshape(-1, 1)
    cols_BT = (start_B1 + torch.arange(length, device=ids_BT.device)).expand(batch, length)
    positions_BT2 = torch.stack([torch.zeros_like(cols_BT), cols_BT], dim=-1)
    return Segment(ids_BT, positions_BT2, torch.ones_like(ids_BT, dtype=torch.bool), "text")
