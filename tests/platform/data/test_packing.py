import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polytrain.errors import DataError
from polytrain.platform.data.packing import PackedDocuments, StoreWindows, next_token_pair
from polytrain.platform.data.token_store import TokenStore, write_piece
from polytrain.tokens import IGNORE_INDEX, Segment

EOS = 9


def test_hand_computed_windows():
    # stream: 1 2 3 E | 4 E | 5 6 E   (E = eos, | = document boundary)
    packed = PackedDocuments([[1, 2, 3], [4], [5, 6]], EOS, window=4, stride=3)
    assert len(packed) == 2  # starts 0 and 3; a third (start 6) would need 10 tokens
    first, second = packed[0], packed[1]
    assert first.values.tolist() == [1, 2, 3, EOS]
    assert first.documents.tolist() == [0, 0, 0, 0] and first.positions[:, 1].tolist() == [0, 1, 2, 3]
    assert second.values.tolist() == [EOS, 4, EOS, 5]
    assert second.documents.tolist() == [0, 1, 1, 2]  # renumbered from 0 in each window
    assert second.positions[:, 1].tolist() == [0, 0, 1, 0]  # restart at the window start and at each document
    assert second.positions[:, 0].eq(0).all() and second.modality == "text"


def reference_windows(documents, window, stride):
    """Naive: walk the stream token by token, tracking the document and the offset since its start."""
    stream, owner = [], []
    for d, ids in enumerate(documents):
        stream += [*ids, EOS]
        owner += [d] * (len(ids) + 1)
    for begin in range(0, len(stream) - window + 1, stride):
        docs, positions = [], []
        for i in range(begin, begin + window):
            run = 0
            while i - run - 1 >= begin and owner[i - run - 1] == owner[i]:
                run += 1
            docs.append(owner[i] - owner[begin])
            positions.append(run)
        yield stream[begin: begin + window], docs, positions


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 8), max_size=12), min_size=1, max_size=8), st.integers(2, 9),
       st.integers(1, 9))
def test_windows_match_a_naive_walk_of_the_stream(documents, window, stride):
    stride = min(stride, window)
    total = sum(len(d) + 1 for d in documents)
    if total < window:
        with pytest.raises(DataError, match=f"fewer than one window of {window}"):
            PackedDocuments(documents, EOS, window, stride)
        return
    packed = PackedDocuments(documents, EOS, window, stride)
    expected = list(reference_windows(documents, window, stride))
    assert len(packed) == len(expected)
    for i, (values, docs, positions) in enumerate(expected):
        assert packed[i].values.tolist() == values
        assert packed[i].documents.tolist() == docs
        assert packed[i].positions[:, 1].tolist() == positions


def test_lm_windows_cover_the_stream_once_as_labels():
    documents = [list(range(10, 10 + n)) for n in (5, 1, 7, 3)]
    seq_len = 4
    packed = PackedDocuments(documents, EOS, window=seq_len + 1, stride=seq_len)
    labels = torch.cat([next_token_pair(packed[i])[1] for i in range(len(packed))])
    assert labels.tolist() == packed.tokens[1: 1 + len(labels)].tolist()
    assert len(packed) == (len(packed.tokens) - 1) // seq_len  # as many windows as unpacked LM training cuts


def test_next_token_pair_shifts_and_keeps_boundaries_for_collate():
    window = PackedDocuments([[1, 2], [3, 4, 5]], EOS, window=6)[0]  # 1 2 E 3 4 5
    inputs, labels = next_token_pair(window)
    assert inputs.values.tolist() == [1, 2, EOS, 3, 4] and labels.tolist() == [2, EOS, 3, 4, 5]
    assert inputs.documents.tolist() == [0, 0, 0, 1, 1] and inputs.positions[:, 1].tolist() == [0, 1, 2, 0, 1]
    segment = Segment.collate([inputs, next_token_pair(PackedDocuments([[7]], EOS, window=2)[0])[0]], pad_value=0)
    assert segment.documents.tolist() == [[0, 0, 0, 1, 1], [0, -1, -1, -1, -1]]


def test_bad_window_arguments_are_refused():
    with pytest.raises(ValueError, match="stride=5 in 1..window"):
        PackedDocuments([[1, 2, 3]], EOS, window=4, stride=5)


def per_sample_losses(model, task: str, batch, rows_of: list[list[int]]) -> dict[int, float]:
    """Each sample's summed token loss, found by its document within its row."""
    logits = model.heads[task](model, batch)
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none",
                                               ignore_index=IGNORE_INDEX).view(batch.labels.shape)
    docs = batch.inputs.documents
    out = {}
    for r, samples in enumerate(rows_of):
        for d, sample in enumerate(samples):
            where = (docs[r] == d) if docs is not None else torch.ones_like(batch.labels[r], dtype=torch.bool)
            out[sample] = float(losses[r][where].sum())
    return out


@pytest.mark.parametrize("head", ["decoder_only", "encoder_decoder"])
def test_a_packed_batch_gives_every_sample_the_loss_it_has_alone(tmp_path, head):
    from PIL import Image

    from polytrain.config.data import TaskConfig
    from polytrain.config.model import BackboneConfig, ModelConfig
    from polytrain.config.tokenizers import ImageTokenizerConfig, TextTokenizerConfig
    from polytrain.models.model import PolyModel
    from polytrain.platform.data.datasets import SequenceDataset
    from polytrain.platform.data.manifest import read_manifest
    from polytrain.platform.data.sequences import first_fit
    from polytrain.tokenizers.image import ImageTokenizer
    from polytrain.tokenizers.text import TextTokenizer

    words = ["zero", "one", "two", "three", "four", "five"]
    text = TextTokenizer.train(["which digit is it " + " ".join(words)] * 20, TextTokenizerConfig(vocab_size=300))
    image = ImageTokenizer(ImageTokenizerConfig(size=8, patch_size=4, channels=1))
    lines = []
    for i, word in enumerate(words):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        question = [{"text": "which digit is it " * (i % 3 + 1)}]
        lines.append(json.dumps({"segments": [{"image": f"{i}.png"}, *question, {"text": word, "scored": True}]}))
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    records = read_manifest(tmp_path / "m.jsonl", "t", False, plain_text_scored=False)
    tokenizers = {"text": text, "image": image}
    decoder_only = head == "decoder_only"
    model = PolyModel(ModelConfig(backbone=BackboneConfig(dim=32, n_heads=4, encoder_layers=0 if decoder_only else 2,
                                                          decoder_layers=2, position="rope", attention="sdpa_math")),
                      [text.embed_spec(), image.embed_spec()], {"t": head}).eval()
    budget = dict(seq_len=48, max_target_len=6)
    packed = SequenceDataset(records, "t", TaskConfig(head=head, train="m", val="m", source="image", packing=True,
                                                      **budget), tokenizers, False)
    alone = SequenceDataset(records, "t", TaskConfig(head=head, train="m", val="m", source="image", **budget),
                            tokenizers, False)
    examples = [packed[i] for i in range(len(records))]
    sizes = [(len(e.inputs),) if decoder_only else (len(e.inputs), len(e.decoder)) for e in examples]
    rows = first_fit(sizes, (48,) if decoder_only else (48, 7))
    assert len(rows) < len(examples)  # the samples really share rows
    with torch.no_grad():
        together = per_sample_losses(model, "t", packed.collate(examples), rows)
        one_by_one = {i: per_sample_losses(model, "t", alone.collate([e]), [[i]])[i] for i, e in enumerate(examples)}
    assert together.keys() == one_by_one.keys()
    for i in one_by_one:
        assert together[i] == pytest.approx(one_by_one[i], abs=1e-5), i


@pytest.mark.parametrize("window, stride", [(4, 3), (9, 8), (2, 1), (33, 33)])
def test_windows_over_a_token_store_equal_those_of_the_stream_in_memory(tmp_path, window, stride):
    rng = np.random.default_rng(window)
    documents = [rng.integers(0, 50, rng.integers(1, 12)).tolist() for _ in range(40)]
    pieces = [write_piece(tmp_path, f"p{k}", documents[k * 10: (k + 1) * 10], np.dtype(np.uint16)) for k in range(4)]
    stored = StoreWindows(TokenStore(tmp_path, pieces, np.uint16, 100), EOS, window, stride)
    packed = PackedDocuments(documents, EOS, window, stride)
    assert len(stored) == len(packed)
    for i in range(len(packed)):
        a, b = stored[i], packed[i]
        assert torch.equal(a.values, b.values) and torch.equal(a.positions, b.positions), i
        assert torch.equal(a.documents, b.documents), i
