"""What a training step consumes and computes: input tokens, and model FLOPs for MFU (model FLOPs utilization).

FLOPs are counted as PaLM does (Chowdhery et al. 2022, appendix B): only matrix
multiplies, two FLOPs per multiply-add, the backward pass twice the forward
(one product for the input gradient, one for the weight gradient), and
attention over the full query x key square whatever the mask (so the figure
does not depend on the kernel's causal tile skipping).  Recomputation
(activation checkpointing) is not counted: it is not model work.

Counted per sample over its real tokens (padding is not model work), with
W the multiply-adds per token of a stack's linear layers (all its blocks;
W_kv the cross-attention key/value projections, applied to the source, W_q,out
the other cross-attention projections, and the projection of the memory to the decoder's width where the
encoder has its own), L a stack's layers, E the model width (the encoder's own in its attention),
V the vocabulary, S source tokens (patches, plus [CLS] when the embedder adds
one), T text tokens, Y the labelled ones (a text head predicts only those in training):

===================  ============================================================================
head                 training FLOPs of one sample
===================  ============================================================================
decoder_only         6 (W_dec T + 2 E L_dec T^2 + V E Y), T counting the slots of non-text spans
encoder_decoder      6 (W_enc S + 2 E L_enc S^2) + 6 (W_dec T + W_kv S + W_q,out T
                     + 2 E L_dec (T^2 + T S) + V E Y)
encoder_classifier   6 (W_enc S + 2 E L_enc S^2) + 6 E C
masked_lm            6 (W_enc T + 2 E L_enc T^2 + (E E + V E) Y)
===================  ============================================================================

(C: classes; W_dec leaves the cross-attention out), plus 4 FLOPs per weight
and token for the linear layers of the image/audio embedders (the patch
projection): they multiply data, which needs no gradient, so their backward is
the weight gradient alone.  Embedders registered by plugins are counted the
same way.  A tower (``model.towers``) counts as an encoder of its own over its
N tokens plus its P class and register tokens, its stem's first layer on data:

    4 W_stem,data N + 6 (W_stem,rest N + W_tower (N + P) + 2 E_t L_t (N + P)^2 + W_proj (N + K))

(W_stem,data the patch projection, or Whisper's first convolution at 2 frames per token; W_stem,rest
its second convolution; E_t, L_t the tower's width and built blocks; K 1 where the class token is
kept), so its cost is in the step's FLOPs and MFU.  Frozen weights (``finetune.freeze``, LoRA's base weights) are
counted as trained, and LoRA adapters' own rank-r products (r (in + out) per
token, small beside in x out) not at all: the figure describes the
architecture, as MFU's convention does.  Heads registered by plugins have no
count; a model with such a task reports no FLOPs (and so no MFU).
``tests/models/test_flops.py`` checks every head against torch's
``FlopCounterMode`` running each sample alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import Tensor, nn

from polytrain.models.heads import DecoderOnlyHead, EncoderClassifierHead, EncoderDecoderHead, MaskedLMHead
from polytrain.models.tower import FRAMES_PER_TOKEN, ConvStem, TowerEmbedder
from polytrain.tokens import IGNORE_INDEX, Segment, TaskBatch

if TYPE_CHECKING:
    from polytrain.models.model import PolyModel

MULTIPLY_ADD = 2
"""FLOPs per multiply-add."""
FORWARD_AND_BACKWARD = 3
"""The backward pass multiplies by the weights and by the activations: twice the forward."""
TRAIN = MULTIPLY_ADD * FORWARD_AND_BACKWARD
"""Training FLOPs per multiply-add of the forward pass."""
TRAIN_ON_DATA = MULTIPLY_ADD * 2
"""The same for a layer applied to data: forward and weight gradient, no input gradient."""
CROSS_PER_TOKEN = ("cross.q", "cross.out")
"""Cross-attention projections applied to every decoder token; ``cross.kv`` is applied to every memory token."""
CROSS = (*CROSS_PER_TOKEN, "cross.kv")


def input_tokens(part: TaskBatch) -> int:
    """Tokens the model reads for one task's batch: its text inputs plus its source tokens (patches or
    text), padding excluded.  Labels are the text shifted by one and are not counted again."""
    return int(part.inputs.mask.sum()) + (0 if part.source is None else int(part.source.mask.sum()))


def scored(part: TaskBatch) -> int:
    """Positions that carry a label."""
    return int((part.labels != IGNORE_INDEX).sum())


def linear_weights(module: nn.Module | None, keep: Callable[[str], bool] = lambda name: True) -> int:
    """Multiply-adds per input row of every ``nn.Linear`` under ``module`` whose name ``keep`` accepts."""
    if module is None:
        return 0
    return sum(m.in_features * m.out_features for name, m in module.named_modules()
               if isinstance(m, nn.Linear) and keep(name))


class TrainFlops:
    """Model FLOPs of training ``model`` on a batch: ``counter(batch)`` (see the module docstring).

    Reads only the module structure, so a model whose parameters ZeRO-3 has partitioned counts the same.
    """

    def __init__(self, model: PolyModel):
        cfg, backbone = model.cfg.backbone, model.backbone
        self.dim, self.enc_layers, self.dec_layers = cfg.dim, cfg.encoder_layers, cfg.decoder_layers
        self.enc_dim = cfg.encoder_stack.dim
        self.encoder = linear_weights(backbone.encoder)
        self.decoder = linear_weights(backbone.decoder, lambda name: not name.endswith(CROSS))
        self.cross_query = linear_weights(backbone.decoder, lambda name: name.endswith(CROSS_PER_TOKEN))
        self.cross_memory = linear_weights(backbone.decoder, lambda name: name.endswith("cross.kv")) + \
            linear_weights(backbone.memory_proj)
        text = model.embedders["text"] if "text" in model.embedders else None
        self.vocab = 0 if text is None else text.table.num_embeddings
        self.embed = {name: linear_weights(e) for name, e in model.embedders.items()}
        self.towers = {name: TowerFlops(e) for name, e in model.embedders.items() if isinstance(e, TowerEmbedder)}
        self.cls = {name: e.added_tokens if isinstance(e, TowerEmbedder) else int(getattr(e, "cls", None) is not None)
                    for name, e in model.embedders.items()}
        counts = {DecoderOnlyHead: self.decoder_only, EncoderDecoderHead: self.encoder_decoder,
                  EncoderClassifierHead: self.encoder_classifier, MaskedLMHead: self.masked_lm}
        self.heads = {task: counts.get(type(head)) for task, head in model.heads.items()}
        self.head_weights = {task: linear_weights(head) for task, head in model.heads.items()}

    @property
    def known(self) -> bool:
        """Whether every task's head has a count."""
        return all(count is not None for count in self.heads.values())

    def __call__(self, batch: dict[str, TaskBatch]) -> int:
        """Training FLOPs of one micro-batch (a forward and backward pass of every task in it)."""
        missing = [task for task in batch if self.heads[task] is None]
        if missing:
            raise ValueError(f"no FLOP count for the heads of tasks {missing}")
        return sum(self.heads[task](part, self.head_weights[task]) for task, part in batch.items())

    def lengths(self, segment: Segment) -> Tensor:
        """(B,) tokens of each row as the stacks see them: real tokens, plus [CLS] where the embedder adds it."""
        return segment.mask.sum(1) + self.cls[segment.modality]

    def embedding(self, segment: Segment) -> int:
        """The embedders over the real tokens, the segment's and its spans': their linear layers (patch
        projections), which multiply data; towers as ``TowerFlops`` counts them."""
        return self.embedded(segment.modality, segment) + sum(self.embedded(m, spans.tokens)
                                                              for m, spans in segment.spans.items())

    def embedded(self, modality: str, segment: Segment) -> int:
        if modality in self.towers:
            return self.towers[modality](segment)
        return TRAIN_ON_DATA * self.embed[modality] * int(segment.mask.sum())

    def encode(self, s: Tensor) -> int:
        return TRAIN * int(self.encoder * s.sum() + 2 * self.enc_dim * self.enc_layers * (s * s).sum())

    def decode(self, t: Tensor, memory: Tensor | None = None) -> int:
        """The decoder stack over rows of ``t`` tokens, cross-attending to rows of ``memory`` tokens."""
        macs = self.decoder * t.sum()
        if memory is not None:
            macs += self.cross_query * t.sum() + self.cross_memory * memory.sum() + \
                2 * self.dim * self.dec_layers * (t * memory).sum()
        return TRAIN * int(macs) + self.self_attention(t)

    def self_attention(self, t: Tensor) -> int:
        """The decoder's q k^T and attention x values over the full square of each row's ``t`` tokens."""
        return TRAIN * 2 * self.dim * self.dec_layers * int((t * t).sum())

    def logits(self, part: TaskBatch) -> int:
        """The vocabulary map over the labelled positions, the only ones a text head predicts in training."""
        return TRAIN * self.vocab * self.dim * scored(part)

    def decoder_only(self, part: TaskBatch, head_weights: int) -> int:
        t = part.inputs.mask.sum(1)
        return self.decode(t) + self.logits(part) + self.embedding(part.inputs)

    def encoder_decoder(self, part: TaskBatch, head_weights: int) -> int:
        s, t = self.lengths(part.source), part.inputs.mask.sum(1)
        return self.encode(s) + self.decode(t, memory=s) + self.logits(part) + self.embedding(part.source)

    def encoder_classifier(self, part: TaskBatch, head_weights: int) -> int:
        s = self.lengths(part.inputs)
        return self.encode(s) + self.embedding(part.inputs) + TRAIN * head_weights * len(s)

    def masked_lm(self, part: TaskBatch, head_weights: int) -> int:
        t = part.inputs.mask.sum(1)
        return self.encode(t) + TRAIN * head_weights * scored(part) + self.logits(part) + self.embedding(part.inputs)


class TowerFlops:
    """A tower's training FLOPs over a segment of its modality (see the module docstring)."""

    def __init__(self, embedder: TowerEmbedder):
        tower = embedder.tower
        stem = tower.stem
        if isinstance(stem, ConvStem):
            self.stem_data, self.stem_rest = FRAMES_PER_TOKEN * stem.conv1.weight.numel(), stem.conv2.weight.numel()
        else:
            self.stem_data, self.stem_rest = linear_weights(stem), 0
        self.blocks = linear_weights(tower.blocks)
        self.attention = 2 * tower.cfg.dim * len(tower.blocks)
        self.projector = linear_weights(embedder.projector)
        self.prefix, self.kept = tower.prefix, embedder.added_tokens

    def __call__(self, segment: Segment) -> int:
        n = segment.mask.sum(1)
        s = n + self.prefix
        return TRAIN_ON_DATA * self.stem_data * int(n.sum()) + TRAIN * int(
            self.stem_rest * n.sum() + self.blocks * s.sum() + self.attention * (s * s).sum()
            + self.projector * (n + self.kept).sum())
