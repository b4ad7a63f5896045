import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st

from polytrain.config.tokenizers import SPECIAL_TOKENS, TextTokenizerConfig
from polytrain.errors import DataError
from polytrain.schema import from_dict
from polytrain.tokenizers.text import TextTokenizer

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


def test_batch_encoding_equals_hf_encode_batch(text):
    texts = [CORPUS[0], "", HARD_CASES[5], "seven eight nine " * 3]
    reference = [e.ids for e in text.hf.encode_batch(texts, add_special_tokens=False)]
    assert text.encode_batch(texts) == reference


def test_non_string_in_a_batch_is_named(text):
    with pytest.raises(DataError, match=r"text #2 is a bytes, not a string"):
        text.encode_batch(["fine", "also fine", b"raw bytes"])


@pytest.mark.parametrize("multiple, length", [(1, 5), (4, 8), (8, 8), (3, 6)])
def test_batch_pads_to_a_multiple_and_truncates_to_max_len(multiple, length):
    cfg = TextTokenizerConfig(vocab_size=300, max_len=5, pad_to_multiple=multiple)
    tok = TextTokenizer.train(CORPUS, cfg)
    texts = ["seven", "word " * 40]  # one short, one cut to max_len=5
    segment = tok.batch(texts)
    assert segment.values.shape == (2, length)
    short = tok.encode("seven")
    assert segment.values[0].tolist() == short + [tok.pad_id] * (length - len(short))
    assert segment.values[1].tolist() == tok.encode("word " * 40)[:5] + [tok.pad_id] * (length - 5)
    assert segment.mask.sum(1).tolist() == [len(short), 5]
    assert tok.overflow.count == 1


def test_overlong_text_is_truncated_with_a_counted_logged_warning(caplog):
    tok = TextTokenizer.train(CORPUS, TextTokenizerConfig(vocab_size=300, max_len=8))
    with caplog.at_level("WARNING", logger="polytrain.tokenizers.overflow"):
        for _ in range(3):
            assert len(tok("word " * 100)) == 8
        assert len(tok("seven")) == len(tok.encode("seven"))  # short text: not counted
    assert tok.overflow.count == 3
    assert len(caplog.records) == 1  # the first cut is logged, then every 1000th
    assert "cut to tokenizers.text.max_len=8" in caplog.text and "1 sample(s) cut so far" in caplog.text


def test_overlong_text_is_refused_when_overflow_is_error():
    tok = TextTokenizer.train(CORPUS, TextTokenizerConfig(vocab_size=300, max_len=8, overflow="error"))
    with pytest.raises(DataError, match=r"text 'word word .*': \d+ tokens exceeds tokenizers.text.max_len=8"):
        tok("word " * 100)
    assert tok("seven eight").values.tolist() == tok.encode("seven eight")  # within max_len: untouched


def test_empty_text_segment_is_refused(text):
    assert text.encode("") == []  # as a document (LM) it is just nothing
    with pytest.raises(DataError, match="empty text"):
        text("")


def gpt2_style_tokenizer_json(folder) -> str:
    """A GPT-2-format tokenizer.json built offline by transformers: byte alphabet, 3 merges, <|endoftext|> last."""
    import transformers

    vocab = {c: i for i, c in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path = str(folder / "gpt2.json")
    transformers.GPT2Tokenizer(vocab=vocab, merges=merges).backend_tokenizer.save(path)
    return path


def test_gpt2_style_tokenizer_json_loads_with_named_and_added_specials(tmp_path, caplog):
    path = gpt2_style_tokenizer_json(tmp_path)
    original = tokenizers.Tokenizer.from_file(path)
    cfg = TextTokenizerConfig(bos="<|endoftext|>", eos="<|endoftext|>")
    with caplog.at_level("INFO", logger="polytrain.tokenizers.text"):
        tok = TextTokenizer.load(path, cfg=cfg, modalities=("image", "audio"), masked=True)
    endoftext = original.token_to_id("<|endoftext|>")
    assert (tok.bos_id, tok.eos_id) == (endoftext, endoftext) == (259, 259)
    added = ["<pad>", "<mask>", "<image>", "</image>", "<audio>", "</audio>"]  # what the run uses and GPT-2 lacks
    assert [tok.hf.token_to_id(t) for t in added] == list(range(260, 266))
    assert tok.pad_id == 260 and tok.vocab_size == 266 and tok.unk_id is None
    assert "added them as ids 260..265" in caplog.text
    plain = "the theme: 東京 🎉"
    assert tok.encode(plain) == original.encode(plain, add_special_tokens=False).ids
    sample = plain + " <|endoftext|>"
    assert tok.decode(tok.encode(sample)) == sample
    assert endoftext not in tok.encode(sample)  # spelled in the text, it stays text
    assert tok.encode(" the") == [258]  # GPT-2's merges apply
    reloaded = TextTokenizer.load(tok.save(tmp_path / "saved"), cfg=cfg)
    assert (reloaded.pad_id, reloaded.vocab_size) == (260, 266) and reloaded.encode(sample) == tok.encode(sample)


def test_a_loaded_file_gets_only_the_special_tokens_the_run_uses(tmp_path):
    """Text alone adds pad, bos, eos; masked_lm the mask; each modality laid out in text its markers."""
    tok = TextTokenizer.load(gpt2_style_tokenizer_json(tmp_path), max_len=32)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (260, 261, 262, 263) and tok.mask_id is None
    assert tok.max_len == 32
    tok = TextTokenizer.load(gpt2_style_tokenizer_json(tmp_path), modalities=("image", "audio"), masked=True)
    assert (tok.mask_id, tok.markers("image"), tok.markers("audio")) == (263, (264, 265), (266, 267))
    with_plugin = TextTokenizer.load(gpt2_style_tokenizer_json(tmp_path), modalities=("motion",))
    assert with_plugin.markers("motion") == (263, 264) and with_plugin.special_ids.tolist()[-2:] == [263, 264]


def test_without_span_markers_a_modality_adds_its_slot_token_alone(tmp_path):
    cfg = TextTokenizerConfig(span_markers=False)
    tok = TextTokenizer.load(gpt2_style_tokenizer_json(tmp_path), cfg=cfg, modalities=("image",))
    assert tok.vocab_size == 264 and tok.hf.token_to_id("</image>") is None
    assert tok.span_layout("image") == (None, tok.hf.token_to_id("<image>"))
    assert TextTokenizer.load(gpt2_style_tokenizer_json(tmp_path), modalities=("image",)).span_layout("image") == \
        ((263, 264), 260)


def test_special_token_config_is_checked():
    from polytrain.errors import ConfigError

    with pytest.raises(ConfigError, match="pad='<eos>': must differ from bos and eos"):
        TextTokenizerConfig(pad="<eos>").check()
    with pytest.raises(ConfigError, match="pad_to_multiple=0"):
        from_dict(TextTokenizerConfig, {"pad_to_multiple": 0})
