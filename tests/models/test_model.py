import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polytrain.config import load_config
from polytrain.config.model import BackboneConfig, DecodingConfig, ModelConfig
from polytrain.errors import ConfigError, DataError
from polytrain.models.heads import text_segment
from polytrain.models.model import PolyModel
from polytrain.tokens import EmbedSpec, Segment, TaskBatch, Tokens, text_tokens

VOCAB, DIM = 50, 32
SPECS = [EmbedSpec("text", VOCAB, (1, 24)), EmbedSpec("image", 12, (3, 3))]


def model(**backbone) -> PolyModel:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(dim=DIM, n_heads=4, encoder_layers=2, decoder_layers=2, **backbone))
    return PolyModel(cfg, SPECS, {"lm": "decoder_only", "caption": "encoder_decoder"}).eval()


def image_segment(batch: int, seed: int = 0) -> Segment:
    g = torch.Generator().manual_seed(seed)
    pos = torch.tensor([[r, c] for r in range(3) for c in range(3)])
    return Segment.collate([Tokens(torch.randn(9, 12, generator=g), pos, "image") for _ in range(batch)])


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


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "rope", "alibi"])
def test_packed_text_documents_give_the_logits_of_separate_rows(position):
    m = model(position=position)
    a, b = torch.randint(10, VOCAB, (7,)), torch.randint(10, VOCAB, (4,))
    head = m.heads["lm"]
    separate = [head(m, TaskBatch(text_segment(t[None]), t[None]))[0] for t in (a, b)]
    packed = text_tokens(torch.cat([a, b]))
    packed.positions[7:, 1] -= 7  # every document starts at position 0
    packed.documents = torch.tensor([0] * 7 + [1] * 4)
    segment = Segment.collate([packed, text_tokens(a)])  # a second, shorter row pads
    logits = head(m, TaskBatch(segment, segment.values))
    assert torch.allclose(logits[0, :7], separate[0], atol=1e-5)
    assert torch.allclose(logits[0, 7:11], separate[1], atol=1e-5)
    assert torch.allclose(logits[1, :7], separate[0], atol=1e-5)


def test_patch_embedder_keeps_patch_content_at_unit_scale():
    m = model()
    assert m.embedders["image"].proj.weight.std().item() == pytest.approx(12**-0.5, rel=0.25)
    assert m.embedders["text"].table.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_residual_outputs_start_smaller_with_depth():
    m = model()
    std = m.backbone.decoder.blocks[0].mlp.proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)


def hold_table_only_inside_forward(embedder: torch.nn.Module) -> None:
    """Keep the text table empty except during the embedder's forward, as ZeRO-3 keeps a partitioned parameter."""
    weight = embedder.table.weight
    full = weight.data
    embedder.register_forward_pre_hook(lambda *_: setattr(weight, "data", full))
    embedder.register_forward_hook(lambda *_: setattr(weight, "data", full.new_empty(0)))
    weight.data = full.new_empty(0)


def test_every_use_of_the_tied_table_runs_inside_the_text_embedders_forward():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(dim=DIM, n_heads=4))
    m = PolyModel(cfg, SPECS, {"lm": "decoder_only", "caption": "encoder_decoder", "mlm": "masked_lm"}).eval()
    ids, image = torch.randint(10, VOCAB, (2, 6)), image_segment(2)
    batch = {"lm": TaskBatch(text_segment(ids[:, :-1]), ids[:, 1:]),
             "caption": TaskBatch(text_segment(ids[:, :-1]), ids[:, 1:], image),
             "mlm": TaskBatch(text_segment(ids), ids)}
    beam = DecodingConfig(strategy="beam", num_beams=3)

    def run():
        torch.manual_seed(1)  # masked_lm draws its masking from the global RNG
        with torch.no_grad():
            return (m(batch), m.heads["lm"].generate(m, ids[:, :2], None, 4, eos_id=2),
                    m.heads["caption"].generate(m, ids[:, :2], image, 4, eos_id=2, decoding=beam))

    want = run()
    hold_table_only_inside_forward(m.embedders["text"])
    got = run()
    assert got[0].keys() == want[0].keys() and all(torch.equal(got[0][k], want[0][k]) for k in want[0])
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_untied_model_has_its_own_output_projection():
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(dim=DIM, n_heads=4, encoder_layers=0), tie_embeddings=False)
    m = PolyModel(cfg, SPECS[:1], {"lm": "decoder_only"})
    h = torch.randn(1, 3, DIM)
    assert m.lm_head.weight.shape == (VOCAB, DIM)
    assert torch.allclose(m.lm_logits(h), h @ m.lm_head.weight.T)


@pytest.mark.parametrize("head, stack", [("encoder_decoder", "encoder"), ("encoder_classifier", "encoder"),
                                         ("decoder_only", "decoder")])
def test_a_head_without_its_stack_names_the_task_and_the_stack(head, stack):
    extra = ["data.tasks.task.classes=[a, b]"] if head == "encoder_classifier" else []
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"data.tasks.task.head={head}", "data.tasks.task.train=x", "data.tasks.task.val=x",
                           f"model.backbone.{stack}_layers=0", *extra])
    assert err.value.key == "data.tasks.task.head" and f"model.backbone.{stack}_layers=0" in str(err.value)


def test_text_heads_need_the_text_spec_but_an_image_classifier_does_not():
    cfg = ModelConfig(backbone=BackboneConfig(dim=DIM, n_heads=4, decoder_layers=0))
    PolyModel(cfg, SPECS[1:], {"classify": "encoder_classifier"})
    with pytest.raises(ValueError, match="text embed spec"):
        PolyModel(cfg, SPECS[1:], {"mlm": "masked_lm"})


ENCODER = {"dim": 16, "n_heads": 2, "norm": "rmsnorm", "position": "rope", "bias": False}
"""An encoder of its own: half the decoder's width, another norm and position encoding."""


def test_an_encoder_of_its_own_is_that_stack_alone_then_projected_to_the_decoders_width():
    composed = model(encoder=ENCODER)
    alone_cfg = ModelConfig(backbone=BackboneConfig(dim=16, n_heads=2, norm="rmsnorm", position="rope", bias=False,
                                                    encoder_layers=2, decoder_layers=0))
    alone = PolyModel(alone_cfg, SPECS[1:], {"classify": "encoder_classifier"}).eval()
    shared = {k: v for k, v in composed.state_dict().items() if k.startswith(("embedders.image.", "backbone.encoder."))}
    assert alone.load_state_dict(shared, strict=False).missing_keys == ["heads.classify.proj.weight",
                                                                        "heads.classify.proj.bias"]
    images = image_segment(2)
    with torch.no_grad():
        features = alone.backbone.encode(alone.embed(images))
        assert torch.equal(composed.backbone.encode(composed.embed(images)), features)
        proj = composed.backbone.memory_proj
        assert torch.allclose(composed.backbone.memory(composed.embed(images)), features @ proj.weight.T + proj.bias)
    text = text_segment(torch.randint(5, VOCAB, (2, 6)))
    loss = composed({"caption": TaskBatch(text, text.values, images)})["caption"]
    loss.backward()
    assert proj.weight.grad.abs().sum() > 0  # the projection learns
    assert composed.heads["caption"].generate(composed, text.values[:, :2], images, 4, eos_id=3).shape[0] == 2


def test_an_encoder_of_its_own_reads_no_text():
    composed = model(encoder=ENCODER)
    text = text_segment(torch.randint(5, VOCAB, (2, 6)))
    with pytest.raises(DataError, match="a text sequence reaches the encoder, or holds spans of another modality"):
        composed({"caption": TaskBatch(text, text.values, text)})
    with pytest.raises(ConfigError, match="model.backbone.encoder=.*data.tasks.mlm uses head masked_lm"):
        load_config(None, ["data.tasks.mlm.head=masked_lm", "data.tasks.mlm.train=x", "data.tasks.mlm.val=x",
                           f"model.backbone.encoder={ENCODER}".replace("'", "")])


@pytest.mark.parametrize("encoder, message", [
    ({"dim": 15}, "model.backbone.encoder.n_heads=4: must be positive and divide dim=15"),
    ({"dropout": 0.1}, "model.backbone.encoder.dropout=0.1: is not a block setting; the encoder may set dim, "),
    ({"norm": "batchnorm"}, "model.backbone.encoder.norm='batchnorm': unknown; known: layernorm, rmsnorm"),
])
def test_bad_encoder_settings_name_the_key(encoder, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.tasks.t.head=decoder_only", "data.tasks.t.train=x", "data.tasks.t.val=x",
                           f"model.backbone.encoder={encoder}"])
    assert str(err.value).startswith(message)
    with pytest.raises(ConfigError, match="model.backbone.encoder=.*but encoder_layers=0"):
        load_config(None, ["data.tasks.t.head=decoder_only", "data.tasks.t.train=x", "data.tasks.t.val=x",
                           "model.backbone.encoder_layers=0", "model.backbone.encoder={dim: 16}"])


def test_models_import_no_distributed_or_tracking_library():
    code = ("import sys, polytrain.models.model, polytrain.models.heads, polytrain.models.embed, "
            "polytrain.models.convert, polytrain.models.presets; "
            "bad = [m for m in ('deepspeed', 'accelerate', 'wandb', 'transformers', 'timm') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    import polytrain.models

    banned = re.compile(r"^\s*(import|from)\s+(deepspeed|accelerate|wandb|torch\.distributed)\b", re.MULTILINE)
    for path in Path(polytrain.models.__file__).parent.glob("*.py"):  # torch itself loads torch.distributed
        assert not banned.search(path.read_text()), path
