"""The whole model: one embedder per modality, the shared backbone, one head per task.

Shape legend: B batch, T text length, E model dim, V vocabulary.
"""

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from polytrain.config.model import ModelConfig, head_kind
from polytrain.config.registries import EMBEDDERS, HEADS
from polytrain.errors import DataError
from polytrain.models.backbone import Backbone
from polytrain.models.embed import Embedded, TokenEmbedder
from polytrain.models.sequence_shard import WHOLE, SequenceShard
from polytrain.models.tower import TowerEmbedder
from polytrain.tokens import EmbedSpec, Segment, TaskBatch

RESIDUAL_OUTPUTS = ("attn.out.weight", "cross.out.weight", "mlp.proj.weight")
"""Projections that write into the residual stream; initialized smaller so depth does not blow it up."""


class PolyModel(nn.Module):
    """``forward(batch)`` returns the training loss of every task in ``batch``, as its head defines it."""

    def __init__(self, cfg: ModelConfig, specs: list[EmbedSpec], task_heads: dict[str, str],
                 task_classes: dict[str, int] | None = None):
        """``task_classes``: the number of classes of each classification task (default: model.heads.classifier's)."""
        super().__init__()
        self.cfg = cfg
        by_modality = {s.modality: s for s in specs}
        self.specs, self.task_heads = by_modality, dict(task_heads)
        """What the model was built for: its embed specs by modality, its tasks' head names (for export)."""
        head_classes = {task: HEADS.get(head) for task, head in task_heads.items()}
        head_cfgs = {task: with_classes(cfg, (task_classes or {}).get(task)) for task in head_classes}
        if "text" not in by_modality and any(head_kind(head).text_output for head in task_heads.values()):
            raise ValueError(f"heads {task_heads} predict text, so the model needs the text embed spec")
        # text feeds the decoder (or the one block shape of both stacks); the other modalities feed the encoder
        encoder_side = replace(cfg, backbone=cfg.backbone.encoder_stack)
        self.embedders = nn.ModuleDict({  # a modality's tower where the config gives it one
            s.modality: TowerEmbedder(s, encoder_side, cfg.towers[s.modality]) if s.modality in cfg.towers
            else EMBEDDERS.get(s.modality)(s, cfg if s.modality == "text" else encoder_side) for s in specs})
        # with no encoder stack a tower is the encoder: the decoder cross-attends to its output (Whisper)
        towers_encode = any(head_kind(head).encoder and head_kind(head).decoder for head in task_heads.values())
        self.backbone = Backbone(cfg.backbone, cross_attention=bool(cfg.towers) and towers_encode)
        self.lm_head = None
        if not cfg.tie_embeddings and "text" in by_modality:
            self.lm_head = nn.Linear(cfg.backbone.dim, by_modality["text"].input_dim, bias=cfg.lm_bias)
        self.heads = nn.ModuleDict({task: cls(head_cfgs[task], by_modality) for task, cls in head_classes.items()})
        self.init_weights(cfg.init_std)
        self.sequence = WHOLE

    def shard_sequences(self, shard: SequenceShard) -> None:
        """Compute ``shard``'s slice of every sequence in training forwards (sequence parallelism: the engine
        calls this with a shard whose exchanges are collectives); ``WHOLE`` undoes it."""
        self.sequence = shard
        for stack in (self.backbone.encoder, self.backbone.decoder):
            if stack is not None:
                stack.sequence = shard

    @property
    def shard(self) -> SequenceShard:
        """The shard a forward now uses: the configured one in training, the whole sequence otherwise."""
        return self.sequence if self.training else WHOLE

    def init_weights(self, std: float) -> None:
        """Normal(0, std) for every linear and embedding weight, then each embedder's own init, if it has one."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for embedder in self.embedders.values():
            if hasattr(embedder, "init_weights"):
                embedder.init_weights(std)
        layers = max(1, sum(len(stack.blocks) for stack in (self.backbone.encoder, self.backbone.decoder) if stack))
        for name, param in self.named_parameters():
            if name.endswith(RESIDUAL_OUTPUTS):
                nn.init.normal_(param, std=std / math.sqrt(2 * layers))

    def embed(self, segment: Segment, decoder: bool = False, bidirectional_spans: bool = False) -> Embedded:
        """The segment's vectors; a text segment's non-text spans are embedded by their modality's embedder and
        placed at their slots, in a fixed order of modalities (so every rank runs the same embedders). Whole, and
        padded for the sequence shard (``shard_sequences``), which the stacks split.

        ``decoder``: the segment feeds the decoder stack, so text takes the decoder's position table where
        ``embed.decoder_positions`` gives it one. ``bidirectional_spans``: each span's tokens may see each other
        whole in a causal stack (prefix-LM).
        """
        if self.cfg.backbone.encoder and segment.modality == "text" and (segment.spans or not decoder):
            raise DataError("a text sequence reaches the encoder, or holds spans of another modality, but "
                            "model.backbone.encoder gives the encoder blocks of their own: then the encoder reads "
                            "one image or audio input per sample and the decoder reads plain text")
        embedder = self.embedders[segment.modality]
        if decoder and isinstance(embedder, TokenEmbedder):
            embedded = embedder(segment, decoder=True)
        else:
            embedded = embedder(segment)
        if segment.spans:
            embedded = self.place_spans(embedded, segment, bidirectional_spans, decoder)
        return self.shard.pad(embedded)

    def place_spans(self, embedded: Embedded, segment: Segment, bidirectional: bool, decoder: bool = False) -> Embedded:
        x_BLE = embedded.x_BLE
        rope = embedded.rope
        spans_BL = torch.full_like(segment.values, -1) if bidirectional else None
        first = 0
        for modality, spans in segment.spans.items():
            inner = without_cls(self.embedders[modality](spans.tokens), spans.tokens.values.shape[1])
            where_NS = spans.tokens.mask & (spans.rows >= 0)[:, None]
            n, s = where_NS.nonzero(as_tuple=True)
            rows, cols = spans.rows[n], spans.starts[n] + s
            placed = inner.x_BLE[n, s].to(x_BLE.dtype)
            if isinstance(self.embedders[modality], TowerEmbedder):  # its slots keep the text's positions
                placed = placed + self.embedders["text"].positions_at(segment.positions[rows, cols], decoder)
            x_BLE = x_BLE.index_put((rows, cols), placed)
            if rope is not None and inner.rope is not None:  # a tower's vectors keep the text's angles
                rope = tuple(table.index_put((rows, cols), own[n, s]) for table, own in zip(rope, inner.rope))
            if spans_BL is not None:
                spans_BL[rows, cols] = first + n
            first += len(spans.rows)
        return replace(embedded, x_BLE=x_BLE, rope=rope, spans_BL=spans_BL)

    def lm_logits(self, h_BTE: Tensor) -> Tensor:
        """Next-token logits (B, T, V): tied to the text embedding table, or the separate ``lm_head``."""
        if self.lm_head is not None:
            return self.lm_head(h_BTE)
        return self.embedders["text"](h_BTE)

    def forward(self, batch: dict[str, TaskBatch]) -> dict[str, Tensor]:
        """The training loss of every task in ``batch``, as its head defines it."""
        return {task: self.heads[task].loss(self, part) for task, part in batch.items()}


def with_classes(cfg: ModelConfig, classes: int | None) -> ModelConfig:
    """``cfg`` with model.heads.classifier.classes set to a task's own class count (when it has one)."""
    if classes is None:
        return cfg
    return replace(cfg, heads=replace(cfg.heads, classifier=replace(cfg.heads.classifier, classes=classes)))


def without_cls(e: Embedded, length: int) -> Embedded:
    """A span's vectors without the [CLS] token its embedder may prepend (the span's markers bound it)."""
    if e.length == length:
        return e
    return Embedded(e.x_BLE[:, 1:], e.valid_BL[:, 1:], None, None if e.rope is None else (e.rope[0][:, 1:],
                                                                                          e.rope[1][:, 1:]))
