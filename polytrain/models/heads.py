"""Heads: how a task drives the shared backbone. Every head has the same entry point.

``head.loss(model, batch)`` for training, ``head(model, batch) -> logits`` and
``head.generate(...)`` for evaluation and decoding.  Heads differ only in what the decoder attends to: nothing
(decoder-only) or the encoder's view of a source segment (encoder-decoder).

Shape legend: B batch, T text length, S source length, E model dim, V vocabulary.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytrain.registry import Registry
from polytrain.tokens import IGNORE_INDEX, Segment, TaskBatch, text_tokens

HEADS: Registry[type["Head"]] = Registry("head")
"""Head class by name, as written in ``data.tasks.<task>.head``."""


class Head(nn.Module):
    needs_encoder = False

    def memory(self, model: nn.Module, source: Segment | None) -> tuple[Tensor | None, Tensor | None]:
        """What the decoder cross-attends to, and which of it is real: (B, S, E), (B, S)."""
        return None, None

    def loss(self, model: nn.Module, batch: TaskBatch) -> Tensor:
        """The scalar training loss of ``batch``: mean next-token cross-entropy over labelled positions."""
        return token_loss(self(model, batch), batch.labels)

    def forward(self, model: nn.Module, batch: TaskBatch) -> Tensor:
        """Teacher-forced logits (B, T, V) for ``batch.inputs``."""
        memory, memory_valid = self.memory(model, batch.source)
        return self.decode(model, batch.inputs, memory, memory_valid)

    def decode(self, model: nn.Module, inputs: Segment, memory: Tensor | None,
               memory_valid: Tensor | None) -> Tensor:
        h_BTE = model.backbone.decode(model.embed(inputs), inputs.mask, memory, memory_valid)
        return model.lm_logits(h_BTE)

    @torch.no_grad()
    def generate(self, model: nn.Module, prompt_BP: Tensor, source: Segment | None, max_new_tokens: int,
                 eos_id: int) -> Tensor:
        """Greedy continuation (B, <= max_new_tokens) of equal-length prompts; rows stop after eos."""
        memory, memory_valid = self.memory(model, source)
        ids = prompt_BP
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            inputs = text_segment(ids)
            next_B = self.decode(model, inputs, memory, memory_valid)[:, -1].argmax(-1)
            next_B = torch.where(done, eos_id, next_B)
            ids = torch.cat([ids, next_B[:, None]], dim=1)
            done |= next_B == eos_id
            if done.all():
                break
        return ids[:, prompt_BP.shape[1]:]


@HEADS.register("decoder_only")
class DecoderOnlyHead(Head):
    """Causal LM over text: next-token prediction, no encoder."""


@HEADS.register("encoder_decoder")
class EncoderDecoderHead(Head):
    """Encoder over the source (any modality), causal decoder over text with cross-attention."""

    needs_encoder = True

    def memory(self, model: nn.Module, source: Segment | None) -> tuple[Tensor, Tensor]:
        if source is None:
            raise ValueError("an encoder-decoder task needs a source segment in every batch")
        return model.backbone.encode(model.embed(source), source.mask), source.mask


def token_loss(logits_BTV: Tensor, labels_BT: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy in fp32 over positions whose label is not ``IGNORE_INDEX``."""
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), labels_BT.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


def text_segment(ids_BT: Tensor) -> Segment:
    """Unpadded ids as a text Segment with positions 0..T-1."""
    row = text_tokens(ids_BT[0])
    batch = len(ids_BT)
    return Segment(ids_BT, row.positions.to(ids_BT.device).expand(batch, -1, -1),
                   torch.ones_like(ids_BT, dtype=torch.bool), "text")
