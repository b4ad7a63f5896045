import numpy as np
import pytest

from polytrain.errors import DataError
from polytrain.platform.data.token_store import TokenStore, piece_sha256, token_dtype, write_piece

EOS = 999


@pytest.fixture
def store(tmp_path):
    """Three pieces (the middle one empty, as a shard whose records were all skipped) and their parts."""
    rng = np.random.default_rng(0)
    parts = [[rng.integers(0, 900, rng.integers(1, 40)).tolist() for _ in range(n)] for n in (7, 0, 5)]
    pieces = [write_piece(tmp_path, f"p{k}", p, np.dtype(np.uint16)) for k, p in enumerate(parts)]
    return TokenStore(tmp_path, pieces, np.uint16, vocab_size=1000), [q for p in parts for q in p]


def test_dtype_is_the_narrowest_that_holds_the_vocabulary():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_parts_read_back_as_written(store):
    tokens, parts = store
    assert tokens.n_parts == len(parts)
    for k, part in enumerate(parts):
        assert tokens.part(k).tolist() == part


def test_stream_windows_match_the_joined_stream(store):
    """Every window of ``part, eos, part, eos, ...`` against the stream built in Python, and the part starts."""
    tokens, parts = store
    stream, starts = [], []
    for part in parts:
        starts.append(len(stream))
        stream += part + [EOS]
    assert tokens.stream_length == len(stream)
    for length in (1, 9, 33, len(stream)):
        for begin in range(0, len(stream) - length + 1, 3):
            ids, begun = tokens.stream_window(begin, length, EOS)
            assert ids.tolist() == stream[begin: begin + length]
            assert begun == [s - begin for s in starts if begin <= s < begin + length]
    with pytest.raises(IndexError):
        tokens.stream_window(len(stream) - 3, 4, EOS)


def test_a_truncated_piece_is_refused_by_name(store, tmp_path):
    tokens, _ = store
    path = tmp_path / "p2.bin"
    path.write_bytes(path.read_bytes()[:-2])
    fresh = TokenStore(tmp_path, tokens.pieces, np.uint16, 1000)
    with pytest.raises(DataError, match=r"p2\.bin: .* truncated"):
        fresh.part(tokens.n_parts - 1)
    assert piece_sha256(tmp_path, "p2") != tokens.pieces[2].sha256


def test_ids_outside_the_vocabulary_are_refused(store, tmp_path):
    tokens, parts = store
    largest = max(range(7), key=lambda k: max(parts[k]))  # the part of piece 0 with the largest id
    small = TokenStore(tmp_path, tokens.pieces, np.uint16, vocab_size=max(parts[largest]))
    with pytest.raises(DataError, match=rf"p0\.bin: token id {max(parts[largest])} is outside the vocabulary"):
        small.part(largest)
