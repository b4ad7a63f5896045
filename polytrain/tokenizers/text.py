"""Text: byte-level BPE on Hugging Face ``tokenizers`` (train, save, load, encode, decode).

Byte-level means every string maps to bytes first, so any Unicode text
round-trips exactly and no id is ever ``<unk>``.  The saved ``tokenizer.json``
is the standard HF format: ``tokenizers.Tokenizer.from_file`` loads it as is.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from polytrain.errors import ConfigError, DataError
from polytrain.tokens import EmbedSpec, Tokens, text_tokens

PAD, BOS, EOS, UNK, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<mask>"
MODALITY_MARKERS = ("<text>", "<image>", "<audio>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK, *MODALITY_MARKERS)
"""Ids 0.. in this order; ``<pad>`` is 0."""
N_BYTES = 256


@dataclass(frozen=True)
class TextTokenizerConfig:
    vocab_size: int = 4096
    """Tokens in the trained vocabulary, special tokens and the 256 byte tokens included."""
    max_len: int = 256
    """Longest token sequence a model sees for one text segment; sizes the text position table."""
    path: str | None = None
    """An existing ``tokenizer.json`` to load; when null, polytrain trains one on the run's text."""
    min_frequency: int = 2
    """A pair must occur this often in the training text to be merged."""

    def check(self) -> None:
        floor = N_BYTES + len(SPECIAL_TOKENS)
        if self.vocab_size <= floor:
            raise ConfigError("vocab_size", self.vocab_size, f"must exceed {floor} (256 bytes + special tokens)")
        if self.max_len < 4:
            raise ConfigError("max_len", self.max_len, "must be >= 4")
        if self.path is not None and not Path(self.path).is_file():
            raise ConfigError("path", self.path, "no such tokenizer.json file")


class TextTokenizer:
    """Byte-level BPE with polytrain's special tokens."""

    modality = "text"

    def __init__(self, tokenizer: tokenizers.Tokenizer, max_len: int):
        missing = [t for t in (PAD, BOS, EOS) if tokenizer.token_to_id(t) is None]
        if missing:
            raise DataError(f"tokenizer lacks the special tokens {missing}; polytrain needs {PAD}, {BOS}, {EOS}")
        # Text that spells a special token ("<eos>") must stay text, not turn into the control id.
        tokenizer.encode_special_tokens = True
        self.hf = tokenizer
        self.max_len = max_len
        self.pad_id, self.bos_id, self.eos_id = (tokenizer.token_to_id(t) for t in (PAD, BOS, EOS))

    @classmethod
    def train(cls, texts: Iterable[str], cfg: TextTokenizerConfig) -> "TextTokenizer":
        """Learn merges from ``texts``."""
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, cfg.max_len)

    @classmethod
    def load(cls, path: str | Path, max_len: int) -> "TextTokenizer":
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)), max_len)
        except Exception as err:  # the HF loader raises bare Exception on a bad file
            raise DataError(f"{path}: not a loadable tokenizer.json ({err})") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.hf.save(str(path))
        return path

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, no special tokens."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        for i, text in enumerate(texts):
            _check_utf8(text, i)
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def __call__(self, text: str) -> Tokens:
        """``text`` as one segment: its ids, truncated to ``max_len``."""
        return text_tokens(self.encode(text)[: self.max_len])

    def embed_spec(self) -> EmbedSpec:
        return EmbedSpec("text", self.vocab_size, (1, self.max_len))


def _check_utf8(text: str, index: int) -> None:
    """Byte-level BPE needs UTF-8; a lone surrogate (e.g. from a bad decode) has none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"text #{index} is not valid Unicode: {err.reason} at character {err.start} "
                        f"({text[err.start]!r})") from None
    except AttributeError:
        raise DataError(f"text #{index} is a {type(text).__name__}, not a string") from None
