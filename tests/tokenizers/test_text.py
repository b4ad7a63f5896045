import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from polytrain.errors import DataError
from polytrain.tokenizers.text import SPECIAL_TOKENS, TextTokenizer, TextTokenizerConfig

CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
          "seven eight nine", "naïve café — 東京 🎉"] * 50

HARD_CASES = ["", " ", "  leading and trailing  ", "tab\tnew\nline\r\n", "NUL\x00byte", "emoji 🎉👩‍👩‍👧 flags 🇫🇷",
              "中文 日本語 한국어", "עברית العربية (RTL)", "e\u0301 combining a\u0308", "\ufeffBOM", "\U0010ffff max"]


@pytest.fixture(scope="module")
def text() -> TextTokenizer:
    return TextTokenizer.train(CORPUS, TextTokenizerConfig(vocab_size=300, max_len=16))


def test_special_tokens_come_first(text):
    assert [text.hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (text.pad_id, text.bos_id, text.eos_id) == (0, 1, 2)
    assert text.vocab_size == 300


@pytest.mark.parametrize("sample", HARD_CASES)
def test_round_trip_hard_cases(text, sample):
    assert text.decode(text.encode(sample)) == sample


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_any_unicode(text, sample):
    ids = text.encode(sample)
    assert text.decode(ids) == sample
    assert all(0 <= i < text.vocab_size for i in ids)


def test_frequent_words_merge_into_single_tokens():
    # With merges to spare, every pre-token (a word with its leading space) seen 50 times becomes one token.
    rich = TextTokenizer.train(CORPUS, TextTokenizerConfig(vocab_size=1000))
    for line in CORPUS[:4]:
        pieces = rich.hf.pre_tokenizer.pre_tokenize_str(line)
        assert len(rich.encode(line)) == len(pieces)


def test_text_spelling_a_special_token_stays_text(text):
    ids = text.encode("x <eos> <image> y")
    assert text.eos_id not in ids and text.decode(ids) == "x <eos> <image> y"


def test_lone_surrogate_is_rejected_with_its_position(text):
    with pytest.raises(DataError, match=r"text #1 is not valid Unicode.*character 4"):
        text.encode_batch(["fine", "bad \ud800 text"])


def test_saved_file_is_a_standard_hf_tokenizer(text, tmp_path):
    path = text.save(tmp_path)
    assert path.name == "tokenizer.json"
    plain = tokenizers.Tokenizer.from_file(str(path))
    sample = "def f(x):\n    return '東京 🎉'"
    assert plain.encode(sample, add_special_tokens=False).ids == text.encode(sample)
    assert TextTokenizer.load(path, 16).encode(sample) == text.encode(sample)


def test_segment_is_truncated_to_max_len_with_row_positions(text):
    tokens = text("word " * 100)
    assert len(tokens) == 16
    assert tokens.positions[:, 0].eq(0).all()
    assert tokens.positions[:, 1].tolist() == list(range(16))


def test_loading_a_non_tokenizer_file_names_it(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=str(bad)):
        TextTokenizer.load(bad, 16)
