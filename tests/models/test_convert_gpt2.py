"""Hugging Face GPT-2 in and out: logits, greedy decoding, a few training steps, export (fp32, CPU, no downloads)."""

import pytest
import torch

from polytrain.models.convert.external import load_state, read_external
from polytrain.models.convert.rules import ConversionError
from tests.helpers import lm
from tests.models.convert_checks import TOLERANCE, causal_lm_round_trip, perturbed

transformers = pytest.importorskip("transformers")

GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, bos_token_id=1, eos_token_id=2)


def gpt2(**changes):
    torch.manual_seed(0)
    return perturbed(transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2, **changes})))


@pytest.mark.parametrize("changes", [{}, dict(tie_word_embeddings=False, n_inner=80, activation_function="gelu")],
                         ids=["tied", "untied_gelu"])
def test_gpt2_round_trips_with_the_same_logits_and_greedy_continuation(changes, tmp_path):
    diffs = causal_lm_round_trip(gpt2(**changes), "GPT2LMHeadModel", transformers.AutoModelForCausalLM, tmp_path)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_the_hubs_base_model_layout_with_mask_buffers_is_read(tmp_path):
    """GPT-2's own Hub file: no ``transformer.`` prefix, the causal-mask buffers saved beside the weights."""
    from safetensors.torch import save_file

    hf = gpt2()
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    (tmp_path / "base").mkdir()
    save_file(state, str(tmp_path / "base" / "model.safetensors"))
    hf.config.save_pretrained(tmp_path / "base")
    model = read_external(tmp_path / "base").build("lm")
    assert torch.equal(model.embedders["text"].table.weight, hf.transformer.wte.weight)


def test_a_preset_takes_weights_from_memory_and_names_a_misshapen_tensor():
    hf = gpt2()
    model = lm("gpt2", 64, 2, 4, 100, 32)
    load_state(model, "lm", "GPT2LMHeadModel", hf.state_dict())
    assert torch.equal(model.backbone.decoder.blocks[1].mlp.proj.weight, hf.transformer.h[1].mlp.c_proj.weight.t())
    shorter = lm("gpt2", 64, 2, 4, 100, 16)
    with pytest.raises(ConversionError, match=r"transformer\.wpe\.weight \(32, 64\) gives \(32, 64\) for polytrain "
                                              r"'embedders\.text\.position\.weight', which is \(16, 64\)"):
        load_state(shorter, "lm", "GPT2LMHeadModel", hf.state_dict())


def test_configs_polytrain_cannot_follow_are_refused_naming_the_key(tmp_path):
    hf = gpt2(scale_attn_by_inverse_layer_idx=True)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ConversionError, match="scale_attn_by_inverse_layer_idx=True"):
        read_external(tmp_path)
