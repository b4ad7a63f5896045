import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from polytrain.models.backbone import BackboneConfig
from polytrain.models.heads import text_segment, token_loss
from polytrain.models.model import ModelConfig, PolyModel
from polytrain.tokens import IGNORE_INDEX, EmbedSpec, Segment, TaskBatch, Tokens

VOCAB, DIM = 50, 32
SPECS = [EmbedSpec("text", VOCAB, (1, 24)), EmbedSpec("image", 12, (3, 3))]


def model() -> PolyModel:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(dim=DIM, n_heads=4, encoder_layers=2, decoder_layers=2))
    return PolyModel(cfg, SPECS, {"lm": "decoder_only", "caption": "encoder_decoder"}).eval()


def image_segment(batch: int, seed: int = 0) -> Segment:
    g = torch.Generator().manual_seed(seed)
    pos = torch.tensor([[r, c] for r in range(3) for c in range(3)])
    return Segment.collate([Tokens(torch.randn(9, 12, generator=g), pos, "image") for _ in range(batch)])


def test_token_loss_is_masked_mean_cross_entropy():
    logits = torch.randn(2, 4, VOCAB)
    labels = torch.tensor([[3, 4, IGNORE_INDEX, IGNORE_INDEX], [5, 6, 7, IGNORE_INDEX]])
    keep = labels != IGNORE_INDEX
    manual = -F.log_softmax(logits, -1)[keep].gather(1, labels[keep][:, None]).mean()
    assert torch.allclose(token_loss(logits, labels), manual)


def test_loss_at_init_is_near_uniform():
    m = model()
    ids = torch.randint(10, VOCAB, (4, 16))
    batch = {"lm": TaskBatch(text_segment(ids[:, :-1]), ids[:, 1:])}
    assert m(batch)["lm"].item() == pytest.approx(math.log(VOCAB), abs=0.1)  # small init: near-uniform logits


def test_encoder_decoder_reads_its_source_and_decoder_only_does_not_need_one():
    m = model()
    ids = torch.randint(10, VOCAB, (2, 5))
    a = m.heads["caption"](m, TaskBatch(text_segment(ids), ids, image_segment(2, seed=0)))
    b = m.heads["caption"](m, TaskBatch(text_segment(ids), ids, image_segment(2, seed=1)))
    assert not torch.allclose(a, b)
    assert m.heads["lm"](m, TaskBatch(text_segment(ids), ids)).shape == (2, 5, VOCAB)


@pytest.mark.parametrize("task", ["lm", "caption"])
def test_greedy_generation_equals_stepwise_argmax(task):
    m = model()
    head = m.heads[task]
    source = image_segment(3) if task == "caption" else None
    prompt = torch.full((3, 1), 1)
    generated = head.generate(m, prompt, source, max_new_tokens=6, eos_id=2)
    ids = prompt
    for step in range(generated.shape[1]):
        logits = head(m, TaskBatch(text_segment(ids), ids, source))
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        finished = (generated[:, :step] == 2).any(1)  # rows pad with eos once done
        assert torch.equal(generated[~finished, step], ids[~finished, -1])


def test_patch_embedder_keeps_patch_content_at_unit_scale():
    m = model()
    assert m.embedders["image"].proj.weight.std().item() == pytest.approx(12**-0.5, rel=0.25)
    assert m.embedders["text"].table.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_models_import_no_distributed_or_tracking_library():
    code = ("import sys, polytrain.models.model, polytrain.models.heads, polytrain.models.embed; "
            "bad = [m for m in ('deepspeed', 'accelerate', 'wandb') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
