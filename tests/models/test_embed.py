import pytest
import torch

from polytrain.config.model import BackboneConfig, EmbedConfig, ModelConfig
from polytrain.config.registries import EMBEDDERS
from polytrain.models.embed import Embedded
from polytrain.models.positions import sinusoidal_table
from polytrain.tokens import EmbedSpec, Segment, Tokens, text_tokens

DIM = 16
TEXT, IMAGE = EmbedSpec("text", 30, (1, 12)), EmbedSpec("image", 6, (3, 4))


def embedder(spec: EmbedSpec, position: str = "learned", **embed):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(dim=DIM, n_heads=2, position=position), embed=EmbedConfig(**embed))
    return EMBEDDERS.get(spec.modality)(spec, cfg)


def text(ids, start=0):
    t = text_tokens(ids)
    t.positions[:, 1] += start
    return Segment.collate([t])


GRID = torch.tensor([[r, c] for r in range(3) for c in range(4)])


def image(n=12):
    return Segment.collate([Tokens(torch.randn(n, 6), GRID[:n], "image")])


def test_text_learned_positions_add_table_row_position_and_modality():
    e = embedder(TEXT)
    seg = text([5, 7, 9], start=2)
    want = e.table.weight[[5, 7, 9]] + e.position.weight[[2, 3, 4]] + e.modality
    assert torch.allclose(e(seg).x_BLE[0], want) and e(seg).rope is None


def test_text_sinusoidal_positions_are_the_papers_table_and_not_parameters():
    e = embedder(TEXT, "sinusoidal", modality_vector=False, scale_tokens=True)
    seg = text([5, 7, 9])
    want = e.table.weight[[5, 7, 9]] * DIM**0.5 + sinusoidal_table(12, DIM)[:3]
    assert torch.allclose(e(seg).x_BLE[0], want, atol=1e-6)
    assert not any("position" in name for name in e.state_dict())


@pytest.mark.parametrize("position", ["rope", "alibi"])
def test_relative_positions_add_nothing_to_the_vectors(position):
    e = embedder(TEXT, position, modality_vector=False)
    out = e(text([5, 7, 9], start=4))
    assert torch.allclose(out.x_BLE[0], e.table.weight[[5, 7, 9]])
    assert (out.rope is None) == (position == "alibi")
    if position == "rope":
        cos, _ = out.rope  # 1-D: every pair turns with the column
        assert cos.shape == (1, 3, 4) and torch.allclose(cos[0, :, 0], torch.cos(torch.tensor([4.0, 5.0, 6.0])))


def test_factorized_patch_positions_add_a_row_and_a_column_vector():
    e = embedder(IMAGE)
    seg = image()
    want = seg.values[0] @ e.proj.weight.T + e.proj.bias + e.position.row.weight[GRID[:, 0]] \
        + e.position.col.weight[GRID[:, 1]] + e.modality
    assert torch.allclose(e(seg).x_BLE[0], want, atol=1e-6)


def test_raster_positions_with_cls_follow_timm_layout():
    e = embedder(IMAGE, patch_positions="raster", cls_token=True, modality_vector=False)
    seg = image(7)
    out = e(seg)
    table = e.position.table.weight
    assert table.shape == (1 + 12, DIM)
    assert torch.allclose(out.x_BLE[0, 0], e.cls + table[0])
    assert torch.allclose(out.x_BLE[0, 1:], seg.values[0] @ e.proj.weight.T + e.proj.bias + table[1:8], atol=1e-6)
    assert out.valid_BL.tolist() == [[True] * 8]


def test_2d_sinusoidal_patch_positions_concatenate_row_and_column_tables():
    e = embedder(IMAGE, "sinusoidal", modality_vector=False)
    seg = image()
    pos = torch.cat([sinusoidal_table(3, DIM // 2)[GRID[:, 0]], sinusoidal_table(4, DIM // 2)[GRID[:, 1]]], -1)
    assert torch.allclose(e(seg).x_BLE[0], seg.values[0] @ e.proj.weight.T + e.proj.bias + pos, atol=1e-6)


def test_2d_rope_turns_half_the_pairs_with_the_row_and_half_with_the_column():
    e = embedder(IMAGE, "rope", cls_token=True)
    cos, sin = e(image()).rope
    assert cos.shape == (1, 13, 4)
    assert torch.equal(cos[0, 0], torch.ones(4)) and torch.equal(sin[0, 0], torch.zeros(4))  # [CLS] unrotated
    rows, cols = GRID[:, 0].float(), GRID[:, 1].float()
    assert torch.allclose(cos[0, 1:, 0], torch.cos(rows)) and torch.allclose(cos[0, 1:, 2], torch.cos(cols))


def test_then_concatenates_a_prefix_and_text():
    a = Embedded(torch.randn(2, 3, DIM), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    b = Embedded(torch.randn(2, 2, DIM), torch.ones(2, 2, dtype=torch.bool), torch.tensor([[0, 1], [0, 0]]))
    joined = a.then(b)
    assert joined.x_BLE.shape == (2, 5, DIM) and joined.valid_BL[0].tolist() == [True, True, False, True, True]
    assert joined.documents_BL.tolist() == [[0, 0, -1, 0, 1], [0, 0, 0, 0, 0]]


def test_embedder_registry():
    assert EMBEDDERS.names() == ["audio", "image", "text"]
