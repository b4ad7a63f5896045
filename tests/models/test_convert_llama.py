"""Hugging Face Llama, Qwen2 and Mistral in and out: logits on a padded batch, greedy decoding, training, export."""

import pytest
import torch

from polytrain.models.convert.external import read_external
from polytrain.models.convert.rules import ConversionError
from tests.models.convert_checks import TOLERANCE, causal_lm_round_trip, perturbed

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=100, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0,
             bos_token_id=1, eos_token_id=2)
"""Grouped-query attention (4 query heads, 2 key/value heads), a RoPE base other than the default."""
CASES = {
    "llama": ("LlamaForCausalLM", {}),
    "llama_biases_tied": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "qwen2": ("Qwen2ForCausalLM", {}),
    "qwen2_tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral_window": ("MistralForCausalLM", dict(sliding_window=48)),
}


def library_model(architecture: str, **changes):
    config_class = getattr(transformers, architecture.removesuffix("ForCausalLM") + "Config")
    torch.manual_seed(0)
    return perturbed(getattr(transformers, architecture)(config_class(**{**SHAPE, **changes})))


@pytest.mark.parametrize("case", CASES)
def test_round_trip_keeps_logits_and_greedy_continuation(case, tmp_path):
    architecture, changes = CASES[case]
    diffs = causal_lm_round_trip(library_model(architecture, **changes), architecture,
                                 transformers.AutoModelForCausalLM, tmp_path)
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_the_architecture_comes_from_the_config(tmp_path):
    library_model("Qwen2ForCausalLM").save_pretrained(tmp_path / "qwen2")
    b = read_external(tmp_path / "qwen2").architecture.model.backbone
    assert (b.n_heads, b.kv_heads, b.mlp_hidden, b.rope_base, b.norm_eps) == (4, 2, 80, 500.0, 1e-5)
    assert b.biases == (True, False, False)  # Qwen2: q/k/v only
    library_model("MistralForCausalLM", sliding_window=48).save_pretrained(tmp_path / "mistral")
    assert read_external(tmp_path / "mistral").architecture.spec.grid == (1, 48)  # full attention up to the window


def test_rope_scaling_and_other_head_dims_are_refused_naming_the_key(tmp_path):
    scaled = dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500.0))
    library_model("LlamaForCausalLM", **scaled).save_pretrained(tmp_path / "scaled")
    with pytest.raises(ConversionError, match="rope_type='linear'"):
        read_external(tmp_path / "scaled")
    library_model("LlamaForCausalLM", head_dim=32).save_pretrained(tmp_path / "wide")
    with pytest.raises(ConversionError, match="head_dim=32"):
        read_external(tmp_path / "wide")


def test_a_base_model_file_of_older_transformers_is_read(tmp_path):
    """No ``model.`` prefix (a ``LlamaModel`` file) and the RoPE frequencies saved as a buffer in every layer."""
    from safetensors.torch import save_file

    hf = library_model("LlamaForCausalLM", tie_word_embeddings=True)
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state.update({f"layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)})
    hf.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    model = read_external(tmp_path).build("lm")
    assert torch.equal(model.backbone.decoder.blocks[1].mlp.proj.weight, hf.model.layers[1].mlp.down_proj.weight)
