import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from polytrain.config.model import (
    BackboneConfig,
    ClassifierConfig,
    DecodingConfig,
    HeadsConfig,
    ModelConfig,
)
from polytrain.models.generation import filter_logits, sample_next
from polytrain.models.heads import text_segment, token_loss
from polytrain.models.mlm_corruption import mask_tokens
from polytrain.models.model import PolyModel
from polytrain.schema import from_dict
from polytrain.tokens import IGNORE_INDEX, EmbedSpec, Segment, Spans, TaskBatch, Tokens

VOCAB, DIM, EOS = 40, 32, 2
SPECS = [EmbedSpec("text", VOCAB, (1, 32)), EmbedSpec("image", 12, (3, 3))]
TASKS = {"lm": "decoder_only", "caption": "encoder_decoder", "classify": "encoder_classifier", "mlm": "masked_lm"}


def model(vocab: int = VOCAB, **backbone) -> PolyModel:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(dim=DIM, n_heads=4, **backbone), init_std=0.3,
                      heads=HeadsConfig(classifier=ClassifierConfig(classes=5)))
    specs = [EmbedSpec("text", vocab, (1, 32)), SPECS[1]]
    return PolyModel(cfg, specs, TASKS).eval()


def image_segment(batch: int, seed: int = 0, lengths=None) -> Segment:
    g = torch.Generator().manual_seed(seed)
    pos = torch.tensor([[r, c] for r in range(3) for c in range(3)])
    lengths = lengths or [9] * batch
    return Segment.collate([Tokens(torch.randn(n, 12, generator=g), pos[:n], "image") for n in lengths])


def test_token_loss_is_masked_mean_cross_entropy():
    logits = torch.randn(2, 4, VOCAB)
    labels = torch.tensor([[3, 4, IGNORE_INDEX, IGNORE_INDEX], [5, 6, 7, IGNORE_INDEX]])
    keep = labels != IGNORE_INDEX
    manual = -F.log_softmax(logits, -1)[keep].gather(1, labels[keep][:, None]).mean()
    assert torch.allclose(token_loss(logits, labels), manual)


def test_label_smoothing_mixes_in_the_uniform_target():
    logits = torch.randn(3, 5, VOCAB)
    labels = torch.randint(0, VOCAB, (3, 5))
    labels[0, 2:] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    log_p = F.log_softmax(logits, -1)[keep]
    nll = -log_p.gather(1, labels[keep][:, None])[:, 0]
    uniform = -log_p.mean(-1)
    want = (0.9 * nll + 0.1 * uniform).mean()
    assert torch.allclose(token_loss(logits, labels, label_smoothing=0.1), want, atol=1e-6)
    assert torch.allclose(F.cross_entropy(logits[keep], labels[keep], label_smoothing=0.1), want, atol=1e-6)


PROMPT = torch.tensor([[1, 9], [1, 17], [1, 23]])


def after_image(ids_BT: torch.Tensor, image: Segment) -> Segment:
    """Each row's image as a span, then the text ids after it; rows left-padded to end together (prompts)."""
    lengths = image.mask.sum(1).tolist()
    batch, text = ids_BT.shape
    length = max(lengths) + text
    values = torch.zeros(batch, length, dtype=torch.long)
    positions = torch.zeros(batch, length, 2, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    starts = []
    for row, n in enumerate(lengths):
        start = length - n - text
        starts.append(start)
        values[row, start + n:] = ids_BT[row]
        positions[row, start:, 1] = torch.arange(n + text)
        mask[row, start:] = True
    return Segment(values, positions, mask, "text", spans={"image": Spans(image, torch.arange(batch),
                                                                          torch.tensor(starts))})


def decoder_input(ids_BT: torch.Tensor, source: Segment | None) -> Segment:
    return text_segment(ids_BT) if source is None else after_image(ids_BT, source)


def no_cache_step_logits(m, task, ids, source):
    if task == "caption":
        return m.heads[task](m, TaskBatch(text_segment(ids), ids, source))[:, -1]
    return m.heads[task](m, TaskBatch(decoder_input(ids, source), ids, bidirectional_spans=True))[:, -1]


def generate(m, task, prompt, source, *args, **kwargs):
    """The head's generation: the caption head reads the image with its encoder; the LM reads it in its prompt."""
    if task == "caption":
        return m.heads[task].generate(m, prompt, source, *args, **kwargs)
    return m.heads[task].generate(m, decoder_input(prompt, source), None, *args, **kwargs)


CACHE_CASES = {
    "learned": dict(),
    "sinusoidal": dict(position="sinusoidal"),
    "rope_gqa": dict(position="rope", n_kv_heads=2),
    "alibi_mqa": dict(position="alibi", n_kv_heads=1),
    "post_norm_rmsnorm_swiglu": dict(norm_position="post", norm="rmsnorm", mlp="swiglu", embed_norm=True),
}
GENERATING = {"lm": None, "lm_with_image_prefix": "image", "caption": "image"}


def generation_case(task: str, case: str) -> tuple[PolyModel, Segment | None, str]:
    """The model of ``case``, the source of ``task`` (rows of 9, 6 and 4 patches) and the head to use."""
    source = image_segment(3, lengths=[9, 6, 4]) if GENERATING[task] else None
    return model(**CACHE_CASES[case]), source, task.split("_with")[0]


@pytest.mark.parametrize("task", GENERATING)
@pytest.mark.parametrize("case", CACHE_CASES)
def test_greedy_generation_with_kv_cache_equals_no_cache_argmax(task, case):
    m, source, head_task = generation_case(task, case)
    generated = generate(m, head_task, PROMPT, source, max_new_tokens=6, eos_id=EOS)
    ids = PROMPT
    for step in range(generated.shape[1]):
        next_ids = no_cache_step_logits(m, head_task, ids, source).argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
        finished = (generated[:, :step] == EOS).any(1)  # rows pad with eos once done
        assert torch.equal(generated[~finished, step], ids[~finished, -1])


@pytest.mark.parametrize("task", GENERATING)
@pytest.mark.parametrize("case", CACHE_CASES)
def test_kv_cache_logits_equal_the_no_cache_forward(task, case):
    m, source, head_task = generation_case(task, case)
    ids = torch.cat([PROMPT, torch.randint(8, VOCAB, (3, 4), generator=torch.Generator().manual_seed(0))], 1)
    with torch.no_grad():
        prefix, start = None, torch.zeros(3, dtype=torch.long)
        if task == "lm_with_image_prefix":  # the image is the context, fed first; the text follows it
            image = after_image(ids[:, :0], source)
            prefix, start = m.embed(image, decoder=True, bidirectional_spans=True), image.mask.sum(1)
        encoder_source = source if head_task == "caption" else None
        capacity = ids.shape[1] + (0 if prefix is None else prefix.length)
        session = m.heads[head_task].session(m, encoder_source, 1, capacity, prefix, start)
        cached = [session.feed(ids[:, :2])] + [session.feed(ids[:, t: t + 1]) for t in range(2, ids.shape[1])]
        uncached = [no_cache_step_logits(m, head_task, ids[:, :t], source) for t in range(2, ids.shape[1] + 1)]
    assert torch.allclose(torch.stack(cached), torch.stack(uncached), atol=1e-5)


@pytest.mark.parametrize("task", GENERATING)
def test_seeded_sampling_with_kv_cache_equals_no_cache_sampling(task):
    m = model(position="rope")
    source = image_segment(3) if GENERATING[task] else None
    head_task = task.split("_with")[0]
    decoding = DecodingConfig(strategy="sample", temperature=0.8, top_k=12, top_p=0.9)
    generated = generate(m, head_task, PROMPT, source, 5, eos_id=-1, decoding=decoding,
                         generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    ids = PROMPT
    for _ in range(5):
        ids = torch.cat([ids, sample_next(no_cache_step_logits(m, head_task, ids, source), decoding, g)[:, None]], 1)
    assert torch.equal(generated, ids[:, 2:])


def test_top_k_and_top_p_keep_what_hugging_face_keeps():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(4, 30) * 3
    for k in (1, 3, 10):
        want = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(filter_logits(logits, k, 1.0).isinf(), want.isinf())
    for p in (0.3, 0.8, 0.95):
        want = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(filter_logits(logits, 0, p).isinf(), want.isinf())


def test_nucleus_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert filter_logits(logits, 0, 0.8).isfinite().tolist() == [[True, True, False, False]]
    assert filter_logits(logits, 0, 0.81).isfinite().tolist() == [[True, True, True, False]]


def test_sampling_draws_from_the_renormalized_top_k():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    draws = sample_next(logits, DecodingConfig(strategy="sample", top_k=2), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[2:].sum() == 0
    assert counts[0].item() == pytest.approx(0.5 / 0.8, abs=0.015)


def sequence_log_prob(m, task, prompt, source, continuation) -> float:
    ids = torch.cat([prompt, torch.tensor([continuation])], dim=1)
    logits = m.heads[task](m, TaskBatch(text_segment(ids), ids, source))
    log_probs = F.log_softmax(logits.double(), -1)[0, prompt.shape[1] - 1: -1]
    return float(log_probs.gather(1, torch.tensor(continuation)[:, None]).sum().detach())


def exhaustive_best(m, task, prompt, source, vocab, steps, alpha) -> list[int]:
    """The best hypothesis by enumeration: each ends at its first eos or runs to the step limit."""
    best, best_score = None, -math.inf
    for length in range(1, steps + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if EOS in seq[:-1] or (length < steps and seq[-1] != EOS):
                continue
            score = sequence_log_prob(m, task, prompt, source, list(seq)) / length**alpha
            if score > best_score:
                best, best_score = list(seq), score
    return best


@pytest.mark.parametrize("task, eos_seed", [("lm", 1), ("caption", 3)])
def test_wide_beam_search_finds_the_exhaustive_best_under_the_length_penalty(task, eos_seed):
    vocab, steps = 5, 3
    m = model(vocab=vocab)
    with torch.no_grad():  # make eos likely enough that the length penalty decides between short and long
        eos_row = m.embedders["text"].table.weight[EOS]
        eos_row += 0.5 * torch.randn(DIM, generator=torch.Generator().manual_seed(eos_seed))
    prompt, source = torch.tensor([[1]]), image_segment(1) if task == "caption" else None
    bests = []
    for alpha in (0.0, 0.7, 2.0):
        best = exhaustive_best(m, task, prompt, source, vocab, steps, alpha)
        decoding = DecodingConfig(strategy="beam", num_beams=vocab**steps, length_penalty=alpha)
        got = m.heads[task].generate(m, prompt, source, steps, EOS, decoding=decoding)[0].tolist()
        assert got[: len(best)] == best and all(t == EOS for t in got[len(best):])
        bests.append(best)
    assert len(bests[0]) < len(bests[-1])  # the penalty changed the answer, so the test can see it


@pytest.mark.parametrize("task", ["lm", "caption"])
def test_one_beam_without_length_penalty_is_greedy(task):
    m = model()
    source = image_segment(3) if task == "caption" else None
    greedy = m.heads[task].generate(m, PROMPT, source, 6, EOS)
    beam = m.heads[task].generate(m, PROMPT, source, 6, EOS, DecodingConfig(strategy="beam", num_beams=1,
                                                                              length_penalty=0.0))
    width = min(greedy.shape[1], beam.shape[1])
    assert torch.equal(greedy[:, :width], beam[:, :width])


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_the_encoder_runs_once_and_cross_attention_keys_once_per_layer(strategy, monkeypatch):
    m = model()
    calls = {"encode": 0, "kv": 0}
    encode = m.backbone.encode
    monkeypatch.setattr(m.backbone, "encode",
                        lambda seq: calls.__setitem__("encode", calls["encode"] + 1) or encode(seq))
    for block in m.backbone.decoder.blocks:
        block.cross.kv.register_forward_hook(lambda *_: calls.__setitem__("kv", calls["kv"] + 1))
    m.heads["caption"].generate(m, PROMPT, image_segment(3), 5, eos_id=-1, decoding=DecodingConfig(strategy=strategy))
    assert calls == {"encode": 1, "kv": len(m.backbone.decoder.blocks)}


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_classifier_pools_the_encoder_output(pooling):
    m = model()
    m.heads["classify"].pooling = pooling
    source = image_segment(2, lengths=[9, 5])
    embedded = m.embed(source)
    h = m.backbone.encode(embedded)
    pooled = h[:, 0] if pooling == "cls" else torch.stack([h[0, :9].mean(0), h[1, :5].mean(0)])
    labels = torch.tensor([3, 1])
    logits = m.heads["classify"](m, TaskBatch(source, labels))
    assert torch.allclose(logits, m.heads["classify"].proj(pooled), atol=1e-5)
    assert logits.shape == (2, 5)
    assert torch.allclose(m.heads["classify"].loss(m, TaskBatch(source, labels)), F.cross_entropy(logits, labels))


def test_bert_masking_rates_and_special_ids():
    ids = torch.randint(0, 50, (400, 64))
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 60:] = False
    corrupted, labels = mask_tokens(ids, valid, 0.15, mask_id=4, special_ids=torch.arange(8), vocab_size=50,
                                    generator=torch.Generator().manual_seed(0))
    eligible = valid & (ids >= 8)
    selected = labels != IGNORE_INDEX
    assert not (selected & ~eligible).any()
    assert torch.equal(labels[selected], ids[selected])
    assert selected.sum() / eligible.sum() == pytest.approx(0.15, abs=0.01)
    masked, kept = corrupted[selected] == 4, corrupted[selected] == ids[selected]
    randomized = ~masked & ~kept
    n = selected.sum()
    assert masked.sum() / n == pytest.approx(0.8, abs=0.02)
    assert (randomized.sum() + (kept & (corrupted[selected] != 4)).sum()) / n == pytest.approx(0.2, abs=0.02)
    assert (corrupted[selected][randomized] >= 8).all()  # random replacements are never special
    assert torch.equal(corrupted[~selected], ids[~selected])


def test_masked_lm_scores_only_the_selected_tokens():
    m = model()
    ids = torch.randint(8, VOCAB, (4, 20))
    masks = [mask_tokens(ids, torch.ones_like(ids, dtype=torch.bool), 0.15, 4, torch.arange(8), VOCAB,
                         torch.Generator().manual_seed(3)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*masks))  # a seeded draw: the data order decides the masks
    corrupted, labels = masks[0]
    batch = TaskBatch(text_segment(corrupted), labels)
    logits = m.heads["mlm"](m, batch)
    assert logits.shape == (4, 20, VOCAB)
    selected = labels != IGNORE_INDEX
    manual = F.cross_entropy(logits[selected], labels[selected])
    assert torch.allclose(m.heads["mlm"].loss(m, batch), manual)


def test_prefix_lm_reads_the_image_span_bidirectionally_and_text_causally():
    m = model()
    ids = torch.randint(8, VOCAB, (2, 5))
    image = image_segment(2, seed=0)
    changed = Segment(image.values.clone(), image.positions, image.mask, "image")
    changed.values[:, -1] += 1.0  # the span's last patch

    def logits(img, bidirectional, text=ids):
        return m.heads["lm"](m, TaskBatch(after_image(text, img), text, bidirectional_spans=bidirectional))

    assert logits(image, True).shape == (2, 9 + 5, VOCAB)
    assert not torch.allclose(logits(image, True)[:, 0], logits(changed, True)[:, 0])  # the span looks ahead
    assert torch.allclose(logits(image, False)[:, 0], logits(changed, False)[:, 0], atol=1e-6)  # causal: not
    later_text = ids.clone()
    later_text[:, -1] = (later_text[:, -1] + 1) % VOCAB
    assert torch.allclose(logits(image, True)[:, :-1], logits(image, True, later_text)[:, :-1], atol=1e-6)


def test_head_loss_applies_label_smoothing_and_ignores_padding():
    m = model()
    m.heads["lm"].label_smoothing = 0.2
    ids = torch.randint(8, VOCAB, (2, 6))
    labels = ids[:, 1:].clone()
    labels[1, 3:] = IGNORE_INDEX
    batch = TaskBatch(text_segment(ids[:, :-1]), labels)
    keep = labels != IGNORE_INDEX
    want = F.cross_entropy(m.heads["lm"](m, batch)[keep], labels[keep], label_smoothing=0.2)
    assert torch.allclose(m.heads["lm"].loss(m, batch), want, atol=1e-6)


@pytest.mark.parametrize("task", ["lm", "caption", "mlm"])
def test_text_heads_train_on_the_labelled_positions_only_with_the_full_logits_loss_and_gradients(task):
    """In training a text head maps only the labelled positions onto the vocabulary: the loss and every
    gradient equal cross-entropy over the logits of all positions (what evaluation reads), the output map sees
    one row per label."""
    m = model().train()
    ids = torch.randint(8, VOCAB, (3, 7))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # a prompt (or the unmasked tokens)
    labels[2, 5:] = IGNORE_INDEX  # padding
    source = image_segment(3, lengths=[9, 6, 4]) if task == "caption" else None
    batch = TaskBatch(after_image(ids, image_segment(3)) if task == "lm" else text_segment(ids), labels, source)
    if task == "lm":
        batch.labels = torch.cat([torch.full((3, 9), IGNORE_INDEX), labels], 1)  # the image's slots carry none
    head = m.heads[task]
    rows, to_vocabulary = [], m.lm_logits
    m.lm_logits = lambda h: (rows.append(h.shape[:-1].numel()), to_vocabulary(h))[1]
    full = token_loss(head(m, batch), batch.labels)
    want = torch.autograd.grad(full, list(m.parameters()), allow_unused=True)
    loss = head.loss(m, batch)
    got = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
    assert rows == [batch.labels.numel(), int((batch.labels != IGNORE_INDEX).sum())] == [rows[0], 3 * 4 - 2]
    torch.testing.assert_close(loss, full, atol=1e-6, rtol=1e-6)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


def test_head_configs_check_their_values():
    from polytrain.errors import ConfigError

    for cls, key, value in ((ClassifierConfig, "classes", 1), (HeadsConfig, "label_smoothing", 1.0),
                            (DecodingConfig, "top_p", 0.0), (DecodingConfig, "num_beams", 0)):
        with pytest.raises(ConfigError) as err:
            from_dict(cls, {key: value})
        assert err.value.key == key
    assert dataclasses.asdict(HeadsConfig())["decoding"]["strategy"] == "greedy"
