"""Towers inside polytrain's model: names, padding and packing, feature selection, spans in a decoder's sequence,
stand-ins, generation with the KV cache and FLOPs (against torch's counter and independent computations)."""

from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from polytrain.config import build_config
from polytrain.config.model import BackboneConfig, ClassifierConfig, HeadsConfig, ModelConfig
from polytrain.config.tower import TowerConfig
from polytrain.errors import ConfigError
from polytrain.models.flops import TrainFlops
from polytrain.models.heads import text_segment
from polytrain.models.model import PolyModel
from polytrain.models.tower import whisper_sinusoids
from polytrain.schema import from_dict
from polytrain.tokenizers.audio import patchify as mel_tokens
from polytrain.tokens import IGNORE_INDEX, EmbedSpec, Segment, Spans, TaskBatch, Tokens
from tests.models.test_flops import row

VOCAB, IMAGE = 50, EmbedSpec("image", 12, (3, 3))
AUDIO = EmbedSpec("audio", 2 * 8, (1, 12))
VIT = TowerConfig(dim=16, layers=2, n_heads=2, mlp_width=24, cls_token=True, registers=2, input_norm=True,
                  layer_scale=True, projector="mlp2x_gelu")
WHISPER = TowerConfig(stem="conv", dim=16, layers=2, n_heads=2, mlp_width=24, cls_token=False, prefix_positions=False,
                      projector="linear")


def model(towers: dict, heads: dict, position: str = "rope", **backbone) -> PolyModel:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(dim=32, n_heads=4, encoder_layers=0, decoder_layers=2, position=position,
                                              attention="sdpa_math", **backbone),
                      heads=HeadsConfig(classifier=ClassifierConfig(classes=3)), towers=towers, tie_embeddings=False)
    return PolyModel(cfg, [EmbedSpec("text", VOCAB, (1, 32)), IMAGE, AUDIO], heads).eval()


def image(rows: int, cols: int, seed: int = 0) -> Tokens:
    grid = torch.cartesian_prod(torch.arange(rows), torch.arange(cols))
    return Tokens(torch.randn(rows * cols, 12, generator=torch.Generator().manual_seed(seed)), grid, "image")


def clip(frames: int) -> Tokens:
    return mel_tokens(torch.randn(frames, 8, generator=torch.Generator().manual_seed(frames)), 8, 2)


def test_tower_parameters_are_named_for_freeze_lr_scale_and_lora_patterns():
    names = set(dict(model({"image": VIT}, {"lm": "decoder_only"}).named_parameters()))
    for name in ("embedders.image.tower.blocks.1.attn.qkv.weight", "embedders.image.tower.blocks.0.attn_scale.gamma",
                 "embedders.image.tower.stem.proj.weight", "embedders.image.tower.stem.cls",
                 "embedders.image.tower.stem.registers", "embedders.image.tower.stem.position.table",
                 "embedders.image.tower.input_norm.weight", "embedders.image.tower.norm.weight",
                 "embedders.image.projector.fc.weight", "embedders.image.projector.proj.weight"):
        assert name in names, name
    assert not any(name.startswith("embedders.image.position") for name in names)


@pytest.mark.parametrize("modality, tokens", [("image", [image(3, 3, 1), image(2, 1, 2), image(1, 3, 3)]),
                                              ("audio", [clip(24), clip(10), clip(2)])])
def test_a_padded_batch_of_different_grids_and_lengths_gives_each_sample_what_it_gives_alone(modality, tokens):
    m = model({"image": VIT, "audio": WHISPER}, {"classify": "encoder_classifier"})
    batch = Segment.collate(tokens)
    with torch.no_grad():
        together = m.embed(batch)
        for i, one in enumerate(tokens):
            alone = m.embed(Segment.collate([one])).x_BLE[0]
            assert together.valid_BL[i].sum() == len(one) == len(alone)
            torch.testing.assert_close(together.x_BLE[i, :len(one)], alone, atol=1e-5, rtol=1e-5)


def test_the_class_token_is_dropped_unless_kept_and_registers_always():
    kept = replace(VIT, keep_cls=True, projector="none", dim=32, n_heads=4)
    for tower, length in ((VIT, 9), (kept, 10)):
        m = model({"image": tower}, {"classify": "encoder_classifier"})
        assert m.embed(Segment.collate([image(3, 3)])).x_BLE.shape[1] == length


def test_whisper_sinusoids_are_whispers_formula():
    table = whisper_sinusoids(5, 8)
    increment = torch.log(torch.tensor(10000.0)) / 3
    angles = torch.arange(5)[:, None] * torch.exp(-increment * torch.arange(4))[None]
    torch.testing.assert_close(table, torch.cat([angles.sin(), angles.cos()], 1))


def image_prompt(ids: torch.Tensor, tokens: list[Tokens], start: int) -> Segment:
    segment = text_segment(ids)
    segment.spans = {"image": Spans(Segment.collate(tokens), torch.arange(len(tokens)),
                                    torch.full((len(tokens),), start))}
    return segment


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_span_vectors_are_the_towers_at_the_texts_positions(position):
    """RoPE: the slots keep the text's angles (LLaVA); learned: the text's position vectors are added."""
    m = model({"image": VIT}, {"lm": "decoder_only"}, position=position)
    ids = torch.randint(5, VOCAB, (1, 14))
    segment = image_prompt(ids, [image(3, 3)], 2)
    with torch.no_grad():
        placed = m.embed(segment, decoder=True)
        tower = m.embedders["image"](Segment.collate([image(3, 3)])).x_BLE[0]
        text = m.embedders["text"](text_segment(ids), decoder=True)
        own = m.embedders["text"].positions_at(text_segment(ids).positions[0, 2:11])
    torch.testing.assert_close(placed.x_BLE[0, 2:11], tower + own)
    torch.testing.assert_close(placed.x_BLE[0, 11:], text.x_BLE[0, 11:])
    if position == "rope":
        torch.testing.assert_close(placed.rope[0], text.rope[0])


def test_a_stand_in_span_gives_every_tower_parameter_a_gradient():
    """A rank with no image in its micro-batch embeds a stand-in placed nowhere: every parameter in the graph."""
    m = model({"image": VIT, "audio": WHISPER}, {"lm": "decoder_only"}).train()
    ids = torch.randint(5, VOCAB, (2, 8))
    segment = text_segment(ids)
    for modality, width in (("image", 12), ("audio", 16)):
        stand_in = Tokens(torch.zeros(1, width), torch.zeros(1, 2, dtype=torch.long), modality)
        segment.spans[modality] = Spans(Segment.collate([stand_in]), torch.tensor([-1]), torch.tensor([0]))
    m({"lm": TaskBatch(segment, ids)})["lm"].backward()
    towers = {n: p for n, p in m.named_parameters() if ".tower." in n or ".projector." in n}
    assert towers and all(p.grad is not None for p in towers.values()), [n for n, p in towers.items() if p.grad is None]


def test_greedy_generation_with_the_cache_equals_argmax_of_full_forwards():
    m = model({"image": VIT}, {"lm": "decoder_only"})
    ids = torch.randint(5, VOCAB, (1, 14))
    prompt = image_prompt(ids, [image(3, 3)], 2)
    with torch.no_grad():
        generated = m.heads["lm"].generate(m, prompt, None, 5, eos_id=0)[0]
        sequence = ids
        for _ in range(5):
            logits = m.heads["lm"](m, TaskBatch(image_prompt(sequence, [image(3, 3)], 2), sequence))
            sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, sequence[0, 14:])


def test_whisper_shaped_encoder_decoder_reads_the_tower_as_its_memory():
    tower = replace(WHISPER, dim=32, n_heads=4, projector="none")
    m = model({"audio": tower}, {"asr": "encoder_decoder"})
    assert m.backbone.encoder is None and m.backbone.decoder.blocks[0].cross is not None
    ids = torch.randint(5, VOCAB, (2, 6))
    source = Segment.collate([clip(20), clip(12)])
    with torch.no_grad():
        logits = m.heads["asr"](m, TaskBatch(text_segment(ids), ids, source))
        memory = m.embed(source)
        h = m.backbone.decode(m.embed(text_segment(ids), decoder=True), memory.x_BLE, memory.valid_BL)
    torch.testing.assert_close(logits, m.lm_logits(h))


def test_tower_flops_match_torchs_counter_sample_by_sample():
    m = model({"image": replace(VIT, layer_scale=False), "audio": WHISPER},
              {"lm": "decoder_only", "classify": "encoder_classifier"}).train()
    ids = torch.randint(5, VOCAB, (2, 14))
    prompt = image_prompt(ids, [image(3, 3), image(2, 2)], 2)
    prompt.mask[1, 12:] = False
    sounds = Segment.collate([clip(20), clip(8)])
    labels = ids.masked_fill(~prompt.mask, IGNORE_INDEX)  # padding carries no label, so no logits
    batch = {"lm": TaskBatch(prompt, labels), "classify": TaskBatch(sounds, torch.tensor([0, 2]))}
    counter = TrainFlops(m)
    for task, part in batch.items():
        reference = 0
        for i in range(2):
            inputs = row(part.inputs, i)
            own = part.labels[i:i + 1, :inputs.values.shape[1]] if task == "lm" else part.labels[i:i + 1]
            one = TaskBatch(inputs, own)
            with FlopCounterMode(display=False) as flops:
                m({task: one})[task].backward()
            reference += flops.get_total_flops()
        assert counter({task: part}) == reference, task


def test_tower_settings_that_do_not_fit_the_run_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="n_heads"):
        from_dict(TowerConfig, {"dim": 10, "n_heads": 3})
    with pytest.raises(ConfigError, match="feature_layer"):
        from_dict(TowerConfig, {"layers": 2, "feature_layer": -4})
    with pytest.raises(ConfigError, match="cls_token"):
        from_dict(TowerConfig, {"stem": "conv"})
    with pytest.raises(ConfigError, match="model.towers.text"):
        from_dict(ModelConfig, {"towers": {"text": {}}}, "model")
    with pytest.raises(ConfigError, match="model.towers.image.projector='none'.*dim=192.*width 256"):
        from_dict(ModelConfig, {"towers": {"image": {"projector": "none"}}}, "model")
    task = {"head": "decoder_only", "source": "audio", "train": "x.jsonl", "val": "x.jsonl"}
    tree = {"data": {"tasks": {"qa": task}}, "model": {"towers": {"audio": {"stem": "conv", "cls_token": False}}}}
    with pytest.raises(ConfigError, match="tokenizers.audio.patch_frames=16: must be 2"):
        build_config(tree)
    tree["tokenizers"] = {"audio": {"patch_frames": 2, "patch_mels": 80}}
    build_config(tree)
    tree["model"]["towers"] = {"audio": {"keep_cls": True}}
    with pytest.raises(ConfigError, match="model.towers.audio.keep_cls=True: task 'qa' lays out audio spans"):
        build_config(tree)
