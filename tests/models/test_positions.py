import math

import pytest
import torch

from polytrain.config.registries import POSITIONS
from polytrain.models.positions import Rotary, alibi_slopes, apply_rotary, sinusoidal_table


def test_sinusoidal_table_is_the_papers_formula():
    table = sinusoidal_table(7, 10)
    for pos in range(7):
        for i in range(5):
            angle = pos / 10000 ** (2 * i / 10)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_1d_rope_equals_hugging_face_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, base = 16, 500.0
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=head_dim, rope_theta=base)
    positions = torch.tensor([[0, 1, 2, 5, 9, 30]])
    q, k = torch.randn(1, 4, 6, head_dim), torch.randn(1, 4, 6, head_dim)
    cos_hf, sin_hf = LlamaRotaryEmbedding(config)(q, positions)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    grid = torch.stack([torch.zeros_like(positions), positions], dim=-1)
    cos, sin = Rotary(head_dim, base, two_d=False)(grid)
    got_q = apply_rotary(q.transpose(1, 2), cos, sin).transpose(1, 2)
    got_k = apply_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2)
    assert torch.allclose(got_q, want_q, atol=1e-5) and torch.allclose(got_k, want_k, atol=1e-5)


def rotated_score(rotary: Rotary, q, k, pos_q, pos_k) -> float:
    cos_q, sin_q = rotary(torch.tensor([[pos_q]]))
    cos_k, sin_k = rotary(torch.tensor([[pos_k]]))
    return float((apply_rotary(q, cos_q, sin_q) * apply_rotary(k, cos_k, sin_k)).sum())


def test_2d_rope_scores_depend_on_row_and_column_offsets_only():
    torch.manual_seed(0)
    rotary = Rotary(16, 100.0, two_d=True)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    base = rotated_score(rotary, q, k, (2, 3), (5, 1))
    assert rotated_score(rotary, q, k, (7, 9), (10, 7)) == pytest.approx(base, abs=1e-4)  # both shifted by (5, 6)
    assert rotated_score(rotary, q, k, (3, 3), (5, 1)) != pytest.approx(base, abs=1e-3)  # row offset changed
    assert rotated_score(rotary, q, k, (2, 4), (5, 1)) != pytest.approx(base, abs=1e-3)  # column offset changed


def test_rope_preserves_norms():
    rotary = Rotary(8, 10000.0, two_d=False)
    x = torch.randn(2, 5, 3, 8)
    cos, sin = rotary(torch.randint(0, 50, (2, 5, 2)))
    assert torch.allclose(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_alibi_slopes_for_a_power_of_two_are_the_geometric_sequence():
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]


@pytest.mark.parametrize("n_heads", [1, 3, 4, 6, 12, 16])
def test_alibi_slopes_equal_hugging_face_bloom(n_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    bias = build_alibi_tensor(torch.ones(1, 3), n_heads, torch.float32)  # slope * key position
    assert torch.allclose(alibi_slopes(n_heads), bias[:, 0, 1])


def test_position_registry():
    assert POSITIONS.names() == ["alibi", "learned", "rope", "sinusoidal"]
    assert POSITIONS.get("rope").rotary and POSITIONS.get("alibi").alibi and POSITIONS.get("learned").table
