"""Text: byte-level BPE on Hugging Face ``tokenizers`` (train, save, load, encode, decode).

Byte-level means every string maps to bytes first, so any Unicode text
round-trips exactly and no id is ever ``<unk>``.  The saved ``tokenizer.json``
is the standard HF format: ``tokenizers.Tokenizer.from_file`` loads it as is.
A ``tokenizer.json`` made elsewhere (GPT-2's, say) loads too: the config names
which of its tokens serve as pad/bos/eos, and polytrain's special tokens it
lacks are appended as new ids.
"""

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import tokenizers
import torch.nn.functional as F
from tokenizers import decoders, models, pre_tokenizers, trainers

from polytrain.errors import ConfigError, DataError
from polytrain.tokenizers.overflow import Overflow, OverflowPolicy
from polytrain.tokens import EmbedSpec, Segment, Tokens, text_tokens

log = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<mask>"
MODALITY_MARKERS = {"text": "<text>", "image": "<image>", "audio": "<audio>"}
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK, *MODALITY_MARKERS.values())
"""Ids 0.. in this order in a tokenizer polytrain trains; ``<pad>`` is 0."""
N_BYTES = 256
PREVIEW_CHARS = 40
"""Characters of a text quoted in messages about it."""


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
    overflow: OverflowPolicy = "truncate"
    """A text segment longer than ``max_len`` (or a target longer than its task's ``max_target_len``):
    ``truncate`` keeps its first tokens (counted, the first and every 1000th logged); ``error`` refuses the
    sample."""
    pad_to_multiple: int = 1
    """``TextTokenizer.batch`` pads every batch to a length that is a multiple of this (8 suits tensor cores)."""
    pad: str = PAD
    """The token that pads batches. A loaded ``tokenizer.json`` that lacks it gets it as a new id."""
    bos: str = BOS
    """The token that starts a target sequence; for a GPT-2 ``tokenizer.json`` name ``<|endoftext|>``."""
    eos: str = EOS
    """The token that ends a sequence and separates packed documents; GPT-2: ``<|endoftext|>``."""

    def check(self) -> None:
        floor = N_BYTES + len(SPECIAL_TOKENS)
        if self.vocab_size <= floor:
            raise ConfigError("vocab_size", self.vocab_size, f"must exceed {floor} (256 bytes + special tokens)")
        if self.max_len < 4:
            raise ConfigError("max_len", self.max_len, "must be >= 4")
        if self.path is not None and not Path(self.path).is_file():
            raise ConfigError("path", self.path, "no such tokenizer.json file")
        if self.pad_to_multiple < 1:
            raise ConfigError("pad_to_multiple", self.pad_to_multiple, "must be >= 1 (1: no rounding)")
        for key in ("pad", "bos", "eos"):
            if not getattr(self, key):
                raise ConfigError(key, getattr(self, key), "must name a token")
        if self.pad in (self.bos, self.eos):
            raise ConfigError("pad", self.pad, "must differ from bos and eos: padding is dropped from the loss")

    @property
    def special_tokens(self) -> list[str]:
        """Every special token the tokenizer must have, in id order for a new one."""
        names = [self.pad, self.bos, self.eos, UNK, MASK, *MODALITY_MARKERS.values()]
        return list(dict.fromkeys(names))


class TextTokenizer:
    """Byte-level BPE with polytrain's special tokens."""

    modality = "text"
    config_class = TextTokenizerConfig

    def __init__(self, tokenizer: tokenizers.Tokenizer, cfg: TextTokenizerConfig):
        missing = [t for t in cfg.special_tokens if tokenizer.token_to_id(t) is None]
        if missing:
            first = tokenizer.get_vocab_size()
            tokenizer.add_special_tokens(missing)
            log.info("the tokenizer lacked the special tokens %s; added them as ids %d..%d", missing, first,
                     tokenizer.get_vocab_size() - 1)
        # Text that spells a special token ("<eos>") must stay text, not turn into the control id.
        tokenizer.encode_special_tokens = True
        self.hf = tokenizer
        self.cfg = cfg
        self.max_len = cfg.max_len
        self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.mask_id = (
            tokenizer.token_to_id(t) for t in (cfg.pad, cfg.bos, cfg.eos, UNK, MASK))
        self.marker_ids = {modality: tokenizer.token_to_id(t) for modality, t in MODALITY_MARKERS.items()}
        """Id of the token that marks each modality's segment."""
        self.overflow = Overflow(cfg.overflow, "tokenizers.text.max_len")

    @classmethod
    def train(cls, texts: Iterable[str], cfg: TextTokenizerConfig) -> "TextTokenizer":
        """Learn merges from ``texts``."""
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=cfg.special_tokens, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, cfg)

    @classmethod
    def load(cls, path: str | Path, max_len: int | None = None,
             cfg: TextTokenizerConfig = TextTokenizerConfig()) -> "TextTokenizer":
        """The ``tokenizer.json`` at ``path`` with ``cfg``'s settings (``max_len``, when given, overrides cfg's)."""
        if max_len is not None:
            cfg = replace(cfg, max_len=max_len)
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the HF loader raises bare Exception on a bad file
            raise DataError(f"{path}: not a loadable tokenizer.json ({err})") from None
        return cls(hf, cfg)

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
        """Ids of each text, no special tokens, no truncation."""
        try:
            encodings = self.hf.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:  # HF's message does not say which text; find it and say why
            if isinstance(texts, str):
                raise TypeError("encode_batch takes a list of strings; encode takes one") from None
            for index, text in enumerate(texts):
                _check_text(text, index)
            raise
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are dropped."""
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def __call__(self, text: str) -> Tokens:
        """``text`` as one segment: its ids, at most ``max_len`` of them (per ``overflow``)."""
        return text_tokens(self._segment(self.encode(text), text))

    def batch(self, texts: list[str]) -> Segment:
        """``texts`` as one right-padded segment: (B, L) ids with L the longest, rounded up to ``pad_to_multiple``."""
        rows = [text_tokens(self._segment(ids, text)) for ids, text in zip(self.encode_batch(texts), texts)]
        segment = Segment.collate(rows, self.pad_id)
        extra = -segment.values.shape[1] % self.cfg.pad_to_multiple
        return Segment(F.pad(segment.values, (0, extra), value=self.pad_id), F.pad(segment.positions, (0, 0, 0, extra)),
                       F.pad(segment.mask, (0, extra)), self.modality)

    def _segment(self, ids: list[int], text: str) -> list[int]:
        if not ids:
            raise DataError("empty text: a text segment needs at least one token")
        if len(ids) > self.max_len:
            self.overflow(f"text {_preview(text)}", f"{len(ids)} tokens", str(self.max_len))
        return ids[: self.max_len]

    def embed_spec(self) -> EmbedSpec:
        return EmbedSpec("text", self.vocab_size, (1, self.max_len))


def _check_text(text: str, index: int) -> None:
    if not isinstance(text, str):
        raise DataError(f"text #{index} is a {type(text).__name__}, not a string")
    check_unicode(text, f"text #{index}")


def check_unicode(text: str, name: str) -> None:
    """Byte-level BPE needs UTF-8; a lone surrogate (from a bad decode, or a JSON ``\\ud800`` escape) has none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{name} is not valid Unicode: {err.reason} at character {err.start} "
                        f"({text[err.start]!r})") from None


def _preview(text: str) -> str:
    return repr(text[:PREVIEW_CHARS] + ("..." if len(text) > PREVIEW_CHARS else ""))
