import torch

from polytrain.tokens import Segment, Tokens, text_tokens


def test_collate_pads_values_positions_and_mask():
    a, b = text_tokens([5, 6, 7]), text_tokens([8])
    seg = Segment.collate([a, b], pad_value=0)
    assert seg.values.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert seg.mask.tolist() == [[True, True, True], [True, False, False]]
    assert seg.positions[:, :, 1].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert seg.documents is None


def test_collate_keeps_document_ids_of_packed_rows():
    packed = text_tokens([1, 2, 3, 4])
    packed.documents = torch.tensor([0, 0, 1, 1])
    seg = Segment.collate([packed, text_tokens([9, 9])])
    assert seg.documents.tolist() == [[0, 0, 1, 1], [0, 0, -1, -1]]


def test_patch_segments_pad_features():
    patches = Tokens(torch.ones(2, 3), torch.tensor([[0, 0], [0, 1]]), "image")
    seg = Segment.collate([patches, Tokens(torch.ones(1, 3), torch.tensor([[0, 0]]), "image")])
    assert seg.values.shape == (2, 2, 3) and seg.values[1, 1].eq(0).all()
