import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from polytrain.config.model import BackboneConfig, ClassifierConfig, EmbedConfig, HeadsConfig, ModelConfig
from polytrain.config.registries import PRESETS
from polytrain.models.flops import TrainFlops, input_tokens
from polytrain.models.heads import DecoderOnlyHead, text_segment
from polytrain.models.model import PolyModel
from polytrain.models.presets import build
from polytrain.tokens import IGNORE_INDEX, EmbedSpec, Segment, Spans, TaskBatch, Tokens, text_tokens
from tests.helpers import lm


def test_decoder_1b_flops_are_palms_six_n_plus_attention_and_megatrons_with_it_halved():
    model = build(PRESETS.get("decoder_1b"), "meta")
    dim, layers, kv_dim, hidden, vocab, seq = 2048, 22, 4 * 64, 5632, 32000, 2048
    per_layer = dim * (dim + 2 * kv_dim) + dim * dim + dim * 2 * hidden + hidden * dim  # qkv, out, swiglu fc, proj
    n = layers * per_layer + vocab * dim  # matrices a token is multiplied by (lm_head included)
    assert per_token(model, seq) == 6 * n + 12 * layers * dim * seq
    halved = per_token(model, seq) - TrainFlops(model).self_attention(torch.tensor([seq])) // 2 // seq
    assert halved == 6 * n + 6 * layers * dim * seq


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_flops_equal_torchs_flop_counter_over_a_training_step(preset):
    seq, batch = 16, 2
    if preset == "llama":
        model = lm("llama", 64, 2, 4, 100, seq, kv_heads=2, hidden=96, attention="sdpa_math")
    else:  # the math path is made of counted matmuls
        model = lm("gpt2", 64, 2, 4, 100, seq, attention="sdpa_math")
    ids = torch.randint(0, 100, (batch, seq + 1))
    with FlopCounterMode(display=False) as counter:
        model({"lm": TaskBatch(text_segment(ids[:, :-1]), ids[:, 1:])})["lm"].backward()
    assert counter.get_total_flops() == per_token(model, seq) * batch * seq


def per_token(model, seq: int) -> int:
    """What the run counts (``TrainFlops``) for one row of ``seq`` text tokens of a decoder-only task, per token."""
    row = TaskBatch(text_segment(torch.zeros(1, seq, dtype=torch.long)), torch.zeros(1, seq, dtype=torch.long))
    return TrainFlops(model)({"lm": row}) // seq


def image_tokens(rows: int, cols: int, features: int) -> Tokens:
    grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols))
    return Tokens(torch.randn(rows * cols, features), grid, "image")


def row(segment: Segment, i: int) -> Segment:
    """Row ``i`` alone, its padding cut off (and its spans with it)."""
    n = int(segment.mask[i].sum())
    spans = {m: Spans(row(s.tokens, int((s.rows == i).nonzero()[0])), torch.tensor([0]), s.starts[s.rows == i])
             for m, s in segment.spans.items()}
    return Segment(segment.values[i:i + 1, :n], segment.positions[i:i + 1, :n], segment.mask[i:i + 1, :n],
                   segment.modality, spans=spans)


def image_then_text(images: list[Tokens], texts: list[Tokens]) -> Segment:
    """Each row: its image as a span, then its text; right-padded."""
    lengths = [len(image) + len(text) for image, text in zip(images, texts)]
    values = torch.zeros(len(texts), max(lengths), dtype=torch.long)
    positions = torch.zeros(len(texts), max(lengths), 2, dtype=torch.long)
    mask = torch.zeros(len(texts), max(lengths), dtype=torch.bool)
    for r, (image, text) in enumerate(zip(images, texts)):
        values[r, len(image): lengths[r]] = text.values
        positions[r, : lengths[r], 1] = torch.arange(lengths[r])
        mask[r, : lengths[r]] = True
    spans = Spans(Segment.collate(images), torch.arange(len(texts)), torch.zeros(len(texts), dtype=torch.long))
    return Segment(values, positions, mask, "text", spans={"image": spans})


def sample(part: TaskBatch, i: int) -> TaskBatch:
    return TaskBatch(row(part.inputs, i), part.labels[i:i + 1, :int(part.inputs.mask[i].sum())],
                     None if part.source is None else row(part.source, i),
                     bidirectional_spans=part.bidirectional_spans)


def scored_labels(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Random labels on every other real position, ``IGNORE_INDEX`` elsewhere (padding included): a text head
    predicts only the labelled ones."""
    labels = torch.randint(0, vocab, mask.shape)
    labels[~mask] = IGNORE_INDEX
    labels[:, ::2] = IGNORE_INDEX
    return labels


@pytest.mark.parametrize("cls_token", [False, True])
def test_every_head_matches_torchs_flop_counter_sample_by_sample(cls_token):
    """The count of a padded batch equals FlopCounterMode over each sample run alone (its real tokens)."""
    torch.manual_seed(0)
    vocab, features = 40, 12
    backbone = BackboneConfig(dim=32, n_heads=4, n_kv_heads=2, encoder_layers=2, decoder_layers=1, mlp="swiglu",
                              attention="sdpa_math")
    cfg = ModelConfig(backbone=backbone, embed=EmbedConfig(cls_token=cls_token), tie_embeddings=cls_token,
                      heads=HeadsConfig(classifier=ClassifierConfig(classes=3, pooling="cls" if cls_token else "mean")))
    specs = [EmbedSpec("text", vocab, (1, 16)), EmbedSpec("image", features, (3, 3))]
    heads = {"lm": "decoder_only", "prefix_lm": "decoder_only", "caption": "encoder_decoder",
             "classify": "encoder_classifier", "mlm": "masked_lm"}
    model = PolyModel(cfg, specs, heads)
    texts = [text_tokens(torch.randint(8, vocab, (n,))) for n in (5, 9)]
    images = [image_tokens(r, c, features) for r, c in ((3, 3), (1, 2))]
    inputs, sources = Segment.collate(texts), Segment.collate(images)
    labels = scored_labels(inputs.mask, vocab)
    prefixed = image_then_text(images, texts)
    batch = {"lm": TaskBatch(inputs, labels),
             "prefix_lm": TaskBatch(prefixed, scored_labels(prefixed.mask, vocab), bidirectional_spans=True),
             "caption": TaskBatch(inputs, labels, sources), "mlm": TaskBatch(inputs, labels),
             "classify": TaskBatch(sources, torch.tensor([0, 2]))}
    counter = TrainFlops(model)
    assert counter.known
    for task, part in batch.items():
        reference = 0
        for i in range(len(texts)):
            one = sample(part, i) if task != "classify" else TaskBatch(row(sources, i), part.labels[i:i + 1])
            with FlopCounterMode(display=False) as flops:
                model({task: one})[task].backward()
            reference += flops.get_total_flops()
        assert counter({task: part}) == reference, task


def test_a_plugin_head_has_no_count():
    with torch.device("meta"):
        model = lm("gpt2", 32, 1, 4, 50, 8)
    model.heads["lm"].__class__ = type("PluginHead", (DecoderOnlyHead,), {})
    assert not TrainFlops(model).known


def test_input_tokens_are_text_plus_source_without_padding():
    texts = [text_tokens([8, 9, 10]), text_tokens([8])]
    images = [image_tokens(2, 2, 4), image_tokens(1, 3, 4)]
    part = TaskBatch(Segment.collate(texts), torch.zeros(2, 3, dtype=torch.long), Segment.collate(images))
    assert input_tokens(part) == (3 + 1) + (4 + 3)


def test_an_encoder_of_its_own_width_matches_torchs_flop_counter():
    """Its attention at its own width, and the projection of its output to the decoder's width, counted."""
    torch.manual_seed(0)
    vocab, features = 40, 12
    backbone = BackboneConfig(dim=32, n_heads=4, encoder_layers=2, decoder_layers=1, mlp="swiglu",
                              attention="sdpa_math", encoder={"dim": 16, "n_heads": 2, "mlp": "gelu", "mlp_width": 24})
    cfg = ModelConfig(backbone=backbone, heads=HeadsConfig(classifier=ClassifierConfig(classes=3)))
    model = PolyModel(cfg, [EmbedSpec("text", vocab, (1, 16)), EmbedSpec("image", features, (3, 3))],
                      {"caption": "encoder_decoder", "classify": "encoder_classifier"})
    texts = [text_tokens(torch.randint(8, vocab, (n,))) for n in (5, 9)]
    sources = Segment.collate([image_tokens(r, c, features) for r, c in ((3, 3), (1, 2))])
    inputs = Segment.collate(texts)
    batch = {"caption": TaskBatch(inputs, scored_labels(inputs.mask, vocab), sources),
             "classify": TaskBatch(sources, torch.tensor([0, 2]))}
    for task, part in batch.items():
        reference = 0
        for i in range(2):
            one = sample(part, i) if task == "caption" else TaskBatch(row(sources, i), part.labels[i:i + 1])
            with FlopCounterMode(display=False) as flops:
                model({task: one})[task].backward()
            reference += flops.get_total_flops()
        assert TrainFlops(model)({task: part}) == reference, task
