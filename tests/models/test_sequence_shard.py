"""The slicing arithmetic of a sequence shard (no process group): the slices of every rank put back together are the
padded whole, labels follow their tokens, per-sample labels go to rank 0, each rank gets its heads."""

import pytest
import torch

from polytrain.models.embed import Embedded
from polytrain.models.sequence_shard import WHOLE, SequenceShard
from polytrain.tokens import IGNORE_INDEX


def embedded(length: int) -> Embedded:
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, length - 2:] = False
    docs = torch.tensor([[0] * (length // 2) + [1] * (length - length // 2), [0] * (length - 2) + [-1, -1]])
    rope = (torch.rand(2, length, 3, generator=g), torch.rand(2, length, 3, generator=g))
    spans = torch.full((2, length), -1)
    spans[0, 1:3] = 0
    return Embedded(torch.randn(2, length, 4, generator=g), valid, docs, rope, spans)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_slices_of_every_rank_make_the_padded_whole(size):
    e = embedded(7)
    padded = SequenceShard(size).pad(e)
    length = -(-7 // size) * size
    assert padded.length == length
    assert torch.equal(padded.x_BLE[:, :7], e.x_BLE) and not padded.x_BLE[:, 7:].any()
    assert torch.equal(padded.valid_BL[:, :7], e.valid_BL) and not padded.valid_BL[:, 7:].any()
    assert (padded.documents_BL[:, 7:] == -1).all() and (padded.spans_BL[:, 7:] == -1).all()
    assert (padded.rope[0][:, 7:] == 1).all() and (padded.rope[1][:, 7:] == 0).all()  # padding is not rotated
    shards = [SequenceShard(size, rank) for rank in range(size)]
    assert torch.equal(torch.cat([s.split(padded.x_BLE) for s in shards], 1), padded.x_BLE)
    for table in (0, 1):
        assert torch.equal(torch.cat([s.split_rope(padded.rope)[table] for s in shards], 1), padded.rope[table])
    labels = torch.arange(14).view(2, 7)
    pieces = [s.labels(labels) for s in shards]
    assert all(p.shape == (2, length // size) for p in pieces)
    whole = torch.cat(pieces, 1)
    assert torch.equal(whole[:, :7], labels) and (whole[:, 7:] == IGNORE_INDEX).all()


def test_a_sample_label_goes_with_the_first_slice():
    classes = torch.tensor([3, 1])
    assert torch.equal(SequenceShard(4, 0).labels(classes), classes)
    assert (SequenceShard(4, 2).labels(classes) == IGNORE_INDEX).all()


def test_each_rank_computes_its_slice_of_the_heads():
    slopes = torch.arange(8.0)
    assert torch.equal(SequenceShard(4, 1).heads(slopes), torch.tensor([2.0, 3.0]))
    assert SequenceShard(4, 1).heads(None) is None


def test_the_whole_sequence_is_the_identity():
    e = embedded(5)
    assert WHOLE.pad(e) is e and WHOLE.split(e.x_BLE) is e.x_BLE and WHOLE.gather(e.x_BLE) is e.x_BLE
    plan = object()
    assert WHOLE.attention(plan) is plan
    with pytest.raises(AssertionError, match="distributed shard"):
        SequenceShard(2).attention(plan)
