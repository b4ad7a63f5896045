import dataclasses
import math
import re

import pytest
import torch

from polytrain.cli import main
from polytrain.config.model import ModelConfig
from polytrain.config.registries import PRESETS
from polytrain.models.heads import text_segment
from polytrain.models.presets import build, parameter_counts
from polytrain.schema import from_dict
from polytrain.tokenizers.image import patchify
from polytrain.tokens import Segment, TaskBatch
from tests.helpers import REPO, polytrain


def encoder_decoder_count(name: str) -> int:
    """Closed form for the default block: per layer 12 E^2 + 13 E (encoder), 16 E^2 + 19 E (with cross-attention)."""
    preset = PRESETS.get(name)
    b = preset.model.backbone
    e, layers = b.dim, b.encoder_layers
    text, image = preset.specs
    embed = text.input_dim * e + text.grid[1] * e + e  # table, positions, modality vector
    embed += image.input_dim * e + e + (image.grid[0] + image.grid[1]) * e + e  # proj, row + col, modality
    return embed + layers * (12 * e * e + 13 * e) + layers * (16 * e * e + 19 * e) + 2 * 2 * e


def on_meta(build):
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def llama_count(name: str) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    b, (text,) = PRESETS.get(name).model.backbone, PRESETS.get(name).specs
    cfg = LlamaConfig(vocab_size=text.input_dim, hidden_size=b.dim, intermediate_size=b.mlp_hidden,
                      num_hidden_layers=b.decoder_layers, num_attention_heads=b.n_heads,
                      num_key_value_heads=b.kv_heads, max_position_embeddings=text.grid[1], tie_word_embeddings=False)
    return on_meta(lambda: LlamaForCausalLM(cfg))


def timm_count(name: str) -> int:
    import timm

    return on_meta(lambda: timm.create_model(name, pretrained=False))


def gpt2_count(name: str) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel

    return on_meta(lambda: GPT2LMHeadModel(GPT2Config()))


def bart_count(name: str) -> int:
    """BART-base, less its second position table and its 2 unused offset rows (polytrain shares one table)."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)
    return on_meta(lambda: BartForConditionalGeneration(cfg)) - (1026 + 2) * 768


REFERENCE_COUNTS = {"tiny": encoder_decoder_count, "small": encoder_decoder_count, "base": encoder_decoder_count,
                    "large": encoder_decoder_count, "decoder_1b": llama_count, "vit_tiny_patch16_224": timm_count,
                    "vit_base_patch16_224": timm_count, "gpt2": gpt2_count, "bart_base": bart_count}


@pytest.mark.parametrize("name", PRESETS.names())
def test_preset_parameter_count_equals_an_independent_count(name):
    preset = PRESETS.get(name)
    assert from_dict(ModelConfig, dataclasses.asdict(preset.model)) == preset.model  # every domain and check holds
    counts = parameter_counts(build(preset, "meta"))
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")
    assert counts["total"] == REFERENCE_COUNTS[name](name)


def test_decoder_1b_is_about_a_billion_parameters():
    assert parameter_counts(build(PRESETS.get("decoder_1b"), "meta"))["total"] == 1_100_048_384  # TinyLlama-1.1B


def test_tiny_preset_trains_a_step():
    torch.manual_seed(0)
    model = build(PRESETS.get("tiny"))
    ids = torch.randint(8, 32000, (2, 17))
    image = Segment.collate([patchify(torch.randn(3, 224, 224), 16) for _ in range(2)])
    losses = model({"lm": TaskBatch(text_segment(ids[:, :-1]), ids[:, 1:]),
                    "caption": TaskBatch(text_segment(ids[:, :-1]), ids[:, 1:], image)})
    for loss in losses.values():
        assert loss.item() == pytest.approx(math.log(32000), abs=0.2)
    sum(losses.values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", PRESETS.names())
def test_model_info_prints_the_independent_count_of_every_preset(name, capsys):
    assert main(["model", "info", name]) == 0
    total = re.search(r"^  total +([\d,]+)$", capsys.readouterr().out, re.MULTILINE)
    assert int(total.group(1).replace(",", "")) == REFERENCE_COUNTS[name](name)


def test_cli_model_info_prints_the_counts(tmp_path):
    proc = polytrain("model", "info", "gpt2", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "total" in proc.stdout and f"{gpt2_count('gpt2'):,}" in proc.stdout
    bad = polytrain("model", "info", "gpt5", cwd=REPO)
    assert bad.returncode == 2 and "unknown model preset 'gpt5'; known: bart_base" in bad.stderr
