"""DeepSpeed-Ulysses sequence parallelism is exact: every head, with N = 2 and 4 gloo processes sharing each
sample, gives the loss and the gradients of the same batch on one process (fp32, <= 1e-5).

Each case is a model and a batch chosen to exercise one part of the split: prefix-LM spans and 2-D RoPE of
image patches inside a causal sequence under GQA; packed documents with ALiBi and activation checkpointing;
cross-attention to a memory that stays split (padded sources, packed ones, an encoder of its own width); the
classifier pooling over the gathered sequence ([CLS] with raster positions, the mean); masked LM; an image
tower (which reads each image whole on every rank) whose projected patches fill a span of the split sequence.
Lengths are not multiples of N, so the padding of the split is exercised too. The processes combine their losses as the
trainer's step does (each rank's slice weighted by its share of the step's target tokens) and sum their
gradients as DeepSpeed's reduction does; the reference is the plain model on one process.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polytrain.config.model import BackboneConfig, ClassifierConfig, EmbedConfig, HeadsConfig, ModelConfig
from polytrain.config.tower import TowerConfig
from polytrain.models.model import PolyModel
from polytrain.tokens import IGNORE_INDEX, EmbedSpec, Segment, Spans, TaskBatch, Tokens

pytestmark = pytest.mark.slow

VOCAB, PATCH = 40, 12
SPECS = [EmbedSpec("text", VOCAB, (1, 64)), EmbedSpec("image", PATCH, (4, 4))]
GRID = torch.tensor([[r, c] for r in range(4) for c in range(4)])


def image_tokens(n: int, g: torch.Generator, document: int | None = None) -> Tokens:
    docs = None if document is None else torch.full((n,), document)
    return Tokens(torch.randn(n, PATCH, generator=g), GRID[:n], "image", docs)


def text_rows(rows: list[list[int]], g: torch.Generator) -> tuple[Segment, torch.Tensor]:
    """Rows of packed documents of the given lengths (positions restart per document), right-padded; labels on
    every real token but each document's first."""
    length = max(sum(row) for row in rows)
    values = torch.randint(5, VOCAB, (len(rows), length), generator=g)
    columns = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    docs = torch.full((len(rows), length), -1)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    for r, row in enumerate(rows):
        start = 0
        for d, n in enumerate(row):
            columns[r, start:start + n] = torch.arange(n)
            mask[r, start:start + n] = True
            docs[r, start:start + n] = d
            labels[r, start + 1:start + n] = torch.randint(5, VOCAB, (n - 1,), generator=g)
            start += n
    positions = torch.stack([torch.zeros_like(columns), columns], -1)
    return Segment(values, positions, mask, "text", docs if any(len(row) > 1 for row in rows) else None), labels


def prefix_lm(g: torch.Generator) -> TaskBatch:
    """Text, an image span (9 and 6 patches), text; the answer after it scored; the span bidirectional."""
    text, labels = text_rows([[19], [15]], g)
    labels[:, :12] = IGNORE_INDEX
    spans = Spans(Segment.collate([image_tokens(9, g), image_tokens(6, g)]), torch.tensor([0, 1]),
                  torch.tensor([2, 3]))
    text.positions[0, 2:11] = torch.stack([torch.zeros(9, dtype=torch.long), torch.arange(2, 11)], -1)
    return TaskBatch(Segment(text.values, text.positions, text.mask, "text", spans={"image": spans}), labels,
                     bidirectional_spans=True)


def packed_lm(g: torch.Generator) -> TaskBatch:
    text, labels = text_rows([[5, 8, 4], [11, 6]], g)
    return TaskBatch(text, labels)


def caption(g: torch.Generator, packed: bool = False) -> TaskBatch:
    if packed:  # two images per row, each its own document, captioned by the row's two text documents
        source = Segment.collate([Tokens(torch.cat([image_tokens(7, g, 0).values, image_tokens(6, g).values]),
                                         torch.cat([GRID[:7], GRID[:6]]), "image",
                                         torch.tensor([0] * 7 + [1] * 6)),
                                  Tokens(image_tokens(9, g).values, GRID[:9], "image", torch.zeros(9, dtype=int))])
        text, labels = text_rows([[4, 5], [7]], g)
        if text.documents is None:
            text.documents = torch.where(text.mask, 0, -1)
    else:
        source = Segment.collate([image_tokens(n, g) for n in (16, 11, 5)])
        text, labels = text_rows([[7], [6], [3]], g)
    return TaskBatch(text, labels, source=source)


def classify(g: torch.Generator) -> TaskBatch:
    images = Segment.collate([image_tokens(n, g) for n in (15, 10, 13)])
    return TaskBatch(images, torch.tensor([3, 0, 4]))


def masked(g: torch.Generator) -> TaskBatch:
    text, labels = text_rows([[13], [9]], g)
    labels[torch.rand(labels.shape, generator=g) < 0.6] = IGNORE_INDEX
    return TaskBatch(text, labels)


CASES = {  # name: (backbone, model settings, head, batch)
    "prefix_lm_rope_2d_gqa": (dict(position="rope", n_kv_heads=4, encoder_layers=0), {}, "decoder_only", prefix_lm),
    "packed_alibi_checkpointing": (dict(position="alibi", encoder_layers=0, checkpointing=True), {}, "decoder_only",
                                   packed_lm),
    "cross_attention": (dict(), {}, "encoder_decoder", caption),
    "cross_attention_packed_own_encoder": (dict(position="sinusoidal", encoder={"dim": 48, "n_heads": 4}), {},
                                           "encoder_decoder", lambda g: caption(g, packed=True)),
    "classifier_cls_raster": (dict(decoder_layers=0), dict(embed=EmbedConfig(cls_token=True, patch_positions="raster"),
                                                           pooling="cls"), "encoder_classifier", classify),
    "classifier_mean_pooler": (dict(decoder_layers=0, position="rope"), dict(pooling="mean", pooler=True),
                               "encoder_classifier", classify),
    "masked_lm": (dict(position="sinusoidal", decoder_layers=0), {}, "masked_lm", masked),
    "prefix_lm_image_tower": (dict(position="rope", encoder_layers=0),
                              dict(towers={"image": TowerConfig(dim=24, layers=2, n_heads=2)}), "decoder_only",
                              prefix_lm),
}


def build(case: str) -> tuple[PolyModel, dict[str, TaskBatch]]:
    backbone, settings, head, batch = CASES[case]
    settings = dict(settings)
    classifier = ClassifierConfig(classes=5, pooling=settings.pop("pooling", "cls"), pooler=settings.pop("pooler",
                                                                                                         False))
    cfg = ModelConfig(backbone=BackboneConfig(**{"dim": 64, "n_heads": 8, "encoder_layers": 2, "decoder_layers": 2,
                                                 **backbone}),
                      init_std=0.2, heads=HeadsConfig(classifier=classifier), **settings)
    torch.manual_seed(0)
    model = PolyModel(cfg, SPECS, {"task": head}).train()
    return model, {"task": batch(torch.Generator().manual_seed(1))}


def grads(model: PolyModel) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def one_process(case: str) -> tuple[float, dict[str, torch.Tensor]]:
    model, batch = build(case)
    loss = model(batch)["task"]
    loss.backward()
    return float(loss), grads(model)


def sharded(rank: int, size: int, port: int, out: str) -> None:
    """One of ``size`` processes sharing every sample: each case's loss and gradients, combined over them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    from polytrain.platform.distributed.process_layout import ProcessLayout
    from polytrain.platform.distributed.sequence_parallel import sequence_shard

    shard = sequence_shard(ProcessLayout(size, size), rank, "gloo")
    results = {}
    for case in CASES:
        model, batch = build(case)
        model.shard_sequences(shard)
        targets = torch.tensor(float((shard.labels(batch["task"].labels) != IGNORE_INDEX).sum()))
        total = targets.clone()
        dist.all_reduce(total)
        loss = model(batch)["task"] * targets / total  # the step's weighting (platform/train/step.py)
        loss.backward()
        combined, gradients = loss.detach(), grads(model)
        for t in (combined, *gradients.values()):
            dist.all_reduce(t)  # DeepSpeed's gradient reduction sums what each slice contributes
        results[case] = (float(combined), gradients)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=["N=2", "N=4"])
def sequence_parallel(request, tmp_path_factory):
    """Every case's combined loss and gradients on N processes (one process group for all of them)."""
    size, out = request.param, tmp_path_factory.mktemp("sp") / "results.pt"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(sharded, args=(size, port, str(out)), nprocs=size, start_method="spawn")
    return size, torch.load(out)


@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients_equal_one_process(sequence_parallel, case):
    size, results = sequence_parallel
    loss, gradients = results[case]
    want_loss, want = one_process(case)
    assert loss == pytest.approx(want_loss, abs=1e-5)
    assert gradients.keys() == want.keys()
    worst = max(float((gradients[name] - want[name]).abs().max()) for name in want)
    assert worst <= 1e-5, f"N={size}: max |gradient difference| {worst:.3g}"
    assert any(float(g.abs().max()) > 1e-3 for g in want.values())  # the comparison is of real gradients
