import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from polytrain.errors import ConfigError
from polytrain.models import presets
from polytrain.models.flops import train_flops_per_token
from polytrain.models.heads import text_segment
from polytrain.tokens import TaskBatch


def test_decoder_1b_flops_are_palms_six_n_plus_attention():
    model = presets.PRESETS.get("decoder_1b").build("meta")
    dim, layers, kv_dim, hidden, vocab, seq = 2048, 22, 4 * 64, 5632, 32000, 2048
    per_layer = dim * (dim + 2 * kv_dim) + dim * dim + dim * 2 * hidden + hidden * dim  # qkv, out, swiglu fc, proj
    n = layers * per_layer + vocab * dim  # matrices a token is multiplied by (lm_head included)
    assert train_flops_per_token(model, seq) == 6 * n + 12 * layers * dim * seq


@pytest.mark.parametrize("preset", ["llama", "gpt2"])
def test_flops_equal_torchs_flop_counter_over_a_training_step(preset):
    seq, batch = 16, 2
    if preset == "llama":
        p = presets.llama("tiny llama", 64, 2, 4, 2, 96, vocab=100, max_len=seq)
    else:
        p = presets.gpt2("tiny gpt2", 64, 2, 4, vocab=100, positions=seq)
    model = presets.with_backbone(p, attention="sdpa_math").build()  # the math path is made of counted matmuls
    ids = torch.randint(0, 100, (batch, seq + 1))
    with FlopCounterMode(display=False) as counter:
        model({"lm": TaskBatch(text_segment(ids[:, :-1]), ids[:, 1:])})["lm"].backward()
    assert counter.get_total_flops() == train_flops_per_token(model, seq) * batch * seq


def test_flops_refuse_a_model_with_an_encoder():
    with pytest.raises(ConfigError, match="encoder_layers"):
        train_flops_per_token(presets.PRESETS.get("tiny").build("meta"), 128)
