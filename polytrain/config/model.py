"""The model's config tree, and the names it may use, known without importing torch.

Each section is a frozen dataclass whose field docstrings are its documentation:
``ModelConfig`` (``model``) holds ``BackboneConfig`` (``model.backbone``),
``EmbedConfig`` (``model.embed``) and ``HeadsConfig`` (``model.heads``);
``DecodingConfig`` configures generation and ``LoraConfig`` the adapters of
``finetune.lora``.  The registries of heads, norms, MLPs, attention kernels and
position encodings declare their built-in names here; the torch modules that
define them (``heads.py``, ``layers.py``, ``attention.py``) register the
objects, and are imported only when a name is looked up.
"""

from dataclasses import dataclass, field
from typing import Annotated, Literal

from polytrain.config.registries import HEADS, KERNELS, MLPS, NORMS, POSITIONS
from polytrain.config.tower import TowerConfig, check_tower
from polytrain.errors import ConfigError
from polytrain.schema import Fraction, NonNegative, Positive, Range, from_dict, to_dict


@dataclass(frozen=True)
class HeadKind:
    """What a head needs from the backbone, the embedders and the data."""

    encoder: bool
    """Runs the backbone's encoder stack."""
    decoder: bool
    """Runs the backbone's decoder stack."""
    text_output: bool
    """Projects onto the text vocabulary (so the model needs the text embedder)."""
    generates: bool
    """Continues text (has ``generate``)."""
    layout: str
    """How a sample's segments reach it: a data layout by name (``config.registries.LAYOUTS``): causal, one
    sequence whose scored text carries the loss; seq2seq, the inputs to the encoder and the scored text to the
    decoder; classify, every segment to the encoder and the sample's class as the target; masked, text whose
    masked tokens are the targets; or a plugin's own."""
    classes: bool = False
    """Predicts one of the task's ``classes`` per sample (so it needs them, and scores whole samples: no packing)."""
    sources: bool = True
    """Reads segments of other modalities than text (a task's ``source``)."""
    text_spans: bool = False
    """Lays every other modality out as a span inside its one text sequence (so the text tokenizer needs that
    modality's markers, and a tower's output fills the span)."""
    masks: bool = False
    """Its targets are masked tokens of its text input (so the text tokenizer needs its mask token)."""


HEAD_KINDS = {
    "decoder_only": HeadKind(encoder=False, decoder=True, text_output=True, generates=True, layout="causal",
                             text_spans=True),
    "encoder_decoder": HeadKind(encoder=True, decoder=True, text_output=True, generates=True, layout="seq2seq"),
    "encoder_classifier": HeadKind(encoder=True, decoder=False, text_output=False, generates=False,
                                   layout="classify", classes=True),
    "masked_lm": HeadKind(encoder=True, decoder=False, text_output=True, generates=False, layout="masked",
                          sources=False, masks=True),
}
"""The built-in heads' kinds; a plugin head's class carries its own as ``kind``."""


def head_kind(name: str) -> HeadKind:
    """The kind of head ``name``: a built-in's without importing it, a plugin's from its class."""
    return HEAD_KINDS[name] if name in HEAD_KINDS else HEADS.get(name).kind


@dataclass(frozen=True)
class PositionKind:
    """What a position encoding needs from each part of the model."""

    table: str | None
    """Absolute table the embedders add: "learned", "sinusoidal", or None."""
    rotary: bool
    """Queries and keys are rotated (RoPE)."""
    alibi: bool
    """Attention scores get a linear distance penalty (ALiBi)."""


LEARNED = PositionKind("learned", rotary=False, alibi=False)
SINUSOIDAL = PositionKind("sinusoidal", rotary=False, alibi=False)
ROPE = PositionKind(None, rotary=True, alibi=False)
ALIBI = PositionKind(None, rotary=False, alibi=True)
"""The built-in position encodings (``config.registries.POSITIONS``)."""


BLOCK_FIELDS = ("dim", "n_heads", "n_kv_heads", "mlp_ratio", "mlp_width", "mlp", "norm", "norm_eps", "norm_position",
                "embed_norm", "layer_scale", "bias", "qkv_bias", "out_bias", "mlp_bias", "position", "rope_base")
"""The ``BackboneConfig`` fields that shape a stack's blocks (and the embedders feeding it), which
``model.backbone.encoder`` may set for the encoder stack alone."""


@dataclass(frozen=True)
class BackboneConfig:
    dim: Positive[int] = 256
    """Width of every token vector (d_model)."""
    n_heads: Positive[int] = 4
    """Query heads per attention layer; must divide ``dim``."""
    n_kv_heads: NonNegative[int] = 0
    """Key/value heads: 0 means ``n_heads`` (multi-head), 1 is multi-query, a divisor of ``n_heads``
    in between is grouped-query attention."""
    encoder_layers: NonNegative[int] = 2
    """Bidirectional blocks; 0 builds a decoder-only backbone."""
    decoder_layers: NonNegative[int] = 2
    """Causal blocks (with cross-attention when there is an encoder); 0 builds an encoder-only backbone."""
    mlp_ratio: Positive[float] = 4.0
    """MLP hidden width as a multiple of ``dim`` (for swiglu, the width of each of its two branches)."""
    mlp_width: Annotated[int, Range(ge=0, note="0: int(dim * mlp_ratio)")] = 0
    """MLP hidden width in channels, overriding ``mlp_ratio``; 0: int(dim * mlp_ratio).  Checkpoint configs
    state the width, which a ratio does not always give back (int(224 * (976 / 224)) is 975)."""
    mlp: str = "gelu"
    """MLP kind: gelu (erf), gelu_tanh (GPT-2), quick_gelu (OpenAI CLIP), relu, swiglu."""
    norm: str = "layernorm"
    """Normalization: layernorm or rmsnorm."""
    norm_eps: Positive[float] = 1e-5
    """Epsilon added to the variance in every norm."""
    norm_position: Literal["pre", "post"] = "pre"
    """pre: x + f(norm(x)) and a final norm after the stack; post: norm(x + f(x)), no final norm."""
    embed_norm: bool = False
    """Normalize each stack's input embeddings (BERT, BART's ``layernorm_embedding``)."""
    layer_scale: bool = False
    """Scale each residual branch by a learned per-channel vector before adding it (CaiT's and DINOv2's
    LayerScale), initialized at 1e-5."""
    bias: bool = True
    """Biases in the attention and MLP projections (unless one of the three below says otherwise)."""
    qkv_bias: bool | None = None
    """Biases in the query/key/value projections (Qwen2 has them, Llama not); None: as ``bias``."""
    out_bias: bool | None = None
    """Bias in the attention output projection; None: as ``bias``."""
    mlp_bias: bool | None = None
    """Biases in the MLP projections; None: as ``bias``."""
    position: str = "learned"
    """Position encoding: learned, sinusoidal (added to the embeddings), rope, alibi (inside attention)."""
    rope_base: Annotated[float, Range(gt=1)] = 10000.0
    """RoPE: wavelength base theta; rotation pair i turns at base^(-i / pairs) radians per position."""
    dropout: Fraction = 0.0
    """Dropout on embeddings, attention weights and residual branches, during training only."""
    drop_path: Fraction = 0.0
    """Stochastic depth: the last block of each stack drops its residual branches at this rate, the first
    at 0, linearly in between (as in DeiT / timm)."""
    attention: str = "auto"
    """Attention kernel: auto, sdpa, sdpa_flash, sdpa_cudnn, sdpa_efficient, sdpa_math, flex, flash_attn
    (see ``polytrain.models.attention``)."""
    checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of storing them (saves memory)."""
    compile: bool = False
    """Compile each block with torch.compile (per block, so masks and caches stay in eager Python)."""
    encoder: dict[str, int | float | bool | str | None] = field(default_factory=dict)
    """Block settings of the encoder stack that differ from the ones above, e.g. ``{dim: 192, norm: layernorm}``
    for a ViT encoder under a Llama decoder (any of dim, n_heads, n_kv_heads, mlp_ratio, mlp_width, mlp, norm,
    norm_eps, norm_position, embed_norm, layer_scale, bias, qkv_bias, out_bias, mlp_bias, position, rope_base).
    The non-text embedders then produce the encoder's width and positions, a learned projection
    (``backbone.memory_proj``) takes the encoder's output to ``dim`` before cross-attention, and the encoder reads
    non-text inputs only: text (its own, or around image spans) keeps to the decoder. {}: one block shape for both
    stacks."""

    def check(self) -> None:
        if self.dim % self.n_heads:
            raise ConfigError("n_heads", self.n_heads, f"must be positive and divide dim={self.dim}")
        if self.n_kv_heads and self.n_heads % self.n_kv_heads:
            raise ConfigError("n_kv_heads", self.n_kv_heads, f"must be 0 or divide n_heads={self.n_heads}")
        if self.encoder_layers + self.decoder_layers == 0:
            raise ConfigError("decoder_layers", self.decoder_layers, "must be >= 0, and encoder_layers + "
                              f"decoder_layers >= 1 (encoder_layers={self.encoder_layers})")
        for key, registry in (("mlp", MLPS), ("norm", NORMS), ("position", POSITIONS)):
            if getattr(self, key) not in registry:
                raise ConfigError(key, getattr(self, key), f"unknown; known: {', '.join(registry.names())}")
        if self.attention != "auto" and self.attention not in KERNELS:
            raise ConfigError("attention", self.attention, f"unknown; known: auto, {', '.join(KERNELS.names())}")
        if self.position == "rope" and self.head_dim % 4:
            raise ConfigError("position", self.position, f"2-D RoPE splits each head in row and column halves of "
                              f"rotation pairs, so dim / n_heads = {self.head_dim} must be divisible by 4")
        if self.encoder:
            self.check_encoder()

    def check_encoder(self) -> None:
        for key, value in self.encoder.items():
            if key not in BLOCK_FIELDS:
                raise ConfigError(f"encoder.{key}", value, f"is not a block setting; the encoder may set "
                                  f"{', '.join(BLOCK_FIELDS)} (layers, dropout and kernels are shared)")
        if not self.encoder_layers:
            raise ConfigError("encoder", self.encoder, "sets the encoder's blocks, but encoder_layers=0")
        self.encoder_stack  # noqa: B018  (building it checks it)

    @property
    def encoder_stack(self) -> "BackboneConfig":
        """The encoder stack's settings: these, with ``encoder``'s in place of the block settings it names."""
        if not self.encoder:
            return self
        return from_dict(BackboneConfig, {**to_dict(self), **self.encoder, "encoder": {}}, "encoder")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_width or int(self.dim * self.mlp_ratio)

    @property
    def biases(self) -> tuple[bool, bool, bool]:
        """Whether the (query/key/value, attention output, MLP) projections have biases."""
        return tuple(self.bias if flag is None else flag for flag in (self.qkv_bias, self.out_bias, self.mlp_bias))


@dataclass(frozen=True)
class EmbedConfig:
    modality_vector: bool = True
    """Add one learned vector per modality to its tokens (off for timm / Hugging Face parity)."""
    patch_positions: Literal["factorized", "raster"] = "factorized"
    """Learned patch positions: "factorized" adds a row and a column vector (any grid up to the
    tokenizer's); "raster" is one vector per patch in row-major order, as timm's ViT ``pos_embed``."""
    cls_token: bool = False
    """Prepend a learned [CLS] vector to every image/audio segment (for pooling="cls" classifiers)."""
    scale_tokens: bool = False
    """Multiply token embeddings by sqrt(dim) before adding positions (Vaswani et al. 2017)."""
    token_types: Annotated[int, Range(ge=0, note="0: no token-type table")] = 0
    """Rows of a learned token-type table in the text embedder (BERT's ``type_vocab_size``); every text
    token adds row 0, as BERT does for a single sentence, and the other rows are kept for export.  0: none."""
    decoder_positions: bool = False
    """Text entering the decoder stack gets a learned position table of its own (BART keeps one per
    stack); false: one table serves both stacks."""


@dataclass(frozen=True)
class ClassifierConfig:
    classes: Annotated[int, Range(ge=2)] = 2
    """Number of classes; labels are ids 0..classes-1."""
    pooling: Literal["cls", "mean"] = "mean"
    """cls: the first token's output (the patch embedders' [CLS] with ``embed.cls_token``, or a text
    segment's first token); mean: the average over real tokens."""
    pooler: bool = False
    """Pass the pooled vector through a learned dim x dim linear map and tanh before the class
    projection (BERT's pooler)."""


@dataclass(frozen=True)
class DecodingConfig:
    strategy: Literal["greedy", "sample", "beam"] = "greedy"
    """greedy: argmax; sample: draw from the filtered softmax; beam: beam search."""
    temperature: Annotated[float, Range(gt=0, note="use strategy=greedy for argmax")] = 1.0
    """sample: logits are divided by this before the softmax (lower is sharper)."""
    top_k: Annotated[int, Range(ge=0, note="0 keeps every token")] = 0
    """sample: keep only the k most likely tokens (0: all)."""
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """sample: keep the smallest set of most likely tokens whose probability reaches p (1: all)."""
    num_beams: Annotated[int, Range(ge=1)] = 4
    """beam: hypotheses kept per prompt."""
    length_penalty: float = 1.0
    """beam: exponent alpha of score = log-prob sum / length ** alpha (0: raw sum; > 0 favours longer)."""


@dataclass(frozen=True)
class HeadsConfig:
    label_smoothing: Fraction = 0.0
    """Share of each target's probability spread uniformly over the vocabulary (or classes) in the loss."""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    """How text heads generate at evaluation and in ``polytrain generate`` (greedy, sampling, beam search)."""


@dataclass(frozen=True)
class LoraConfig:
    rank: Annotated[int, Range(ge=0, note="0 turns LoRA off")] = 0
    """Rank of each adapter (0: no LoRA)."""
    alpha: Positive[float] = 16.0
    """The update is scaled by alpha / rank, so changing the rank does not change the step size."""
    dropout: Fraction = 0.0
    """Dropout on the adapter's input during training."""
    targets: list[str] = field(default_factory=lambda: ["*.attn.qkv", "*.attn.out", "*.mlp.fc", "*.mlp.proj"])
    """Glob patterns of linear-layer module names to adapt (names as ``model.named_modules()`` lists them,
    e.g. ``backbone.encoder.blocks.0.attn.qkv``)."""

    def check(self) -> None:
        if self.rank and not self.targets:
            raise ConfigError("targets", self.targets, "needs at least one module-name pattern when rank > 0")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    init_std: Positive[float] = 0.02
    """Std of the normal init of every linear and embedding weight (residual outputs: / sqrt(2 * layers))."""
    tie_embeddings: bool = True
    """Text LM logits use the text embedding table (GPT-2, BART); false adds a separate ``lm_head``."""
    lm_bias: bool = False
    """Text LM logits get a learned bias per vocabulary entry (BERT's ``cls.predictions.bias``), beside the
    tied table or in the ``lm_head``."""
    towers: dict[str, TowerConfig] = field(default_factory=dict)
    """A tower by modality: that modality's embedder is an encoder of its own plus a projector into the
    backbone's width (LLaVA's vision tower, Whisper's encoder) instead of the plain patch embedding; see
    ``polytrain.config.tower``. {}: every modality has its plain embedder."""

    def check(self) -> None:
        backbone = self.backbone
        for modality, tower in self.towers.items():
            check_tower(modality, tower, backbone.encoder_stack.dim)
        if self.embed.decoder_positions and (POSITIONS.get(backbone.position).table != "learned"
                                             or not backbone.encoder_layers or not backbone.decoder_layers):
            raise ConfigError("embed.decoder_positions", True, "needs learned positions and both stacks, got "
                              f"backbone.position={backbone.position}, encoder_layers={backbone.encoder_layers}, "
                              f"decoder_layers={backbone.decoder_layers}")
