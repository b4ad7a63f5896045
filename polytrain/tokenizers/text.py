"""Text: byte-level BPE on Hugging Face ``tokenizers`` (train, save, load, encode, decode).

Byte-level means every string maps to bytes first, so any Unicode text
round-trips exactly and no id is ever ``<unk>``.  The saved ``tokenizer.json``
is the standard HF format: ``tokenizers.Tokenizer.from_file`` loads it as is.
A ``tokenizer.json`` made elsewhere (GPT-2's, say) loads too: the config names
which of its tokens serve as pad/bos/eos, and polytrain's special tokens it
lacks are appended as new ids.
"""

import logging
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import tokenizers
import torch
import torch.nn.functional as F
from tokenizers import decoders, models, pre_tokenizers, trainers

from polytrain.config.tokenizers import UNK, TextTokenizerConfig
from polytrain.config.tokenizers import markers as marker_tokens
from polytrain.errors import DataError
from polytrain.tokenizers.overflow import Overflow
from polytrain.tokens import EmbedSpec, Segment, Tokens, text_tokens

log = logging.getLogger(__name__)

PREVIEW_CHARS = 40
"""Characters of a text quoted in messages about it."""


class TextTokenizer:
    """Byte-level BPE with polytrain's special tokens."""

    modality = "text"
    config_class = TextTokenizerConfig

    def __init__(self, tokenizer: tokenizers.Tokenizer, cfg: TextTokenizerConfig, modalities: tuple[str, ...] = (),
                 masked: bool = False):
        """``modalities``: the modalities whose spans the run lays out in text; ``masked``: it has a masked_lm task.
        A tokenizer that lacks a special token these use (a checkpoint's) gets it as a new id, and no other."""
        missing = [t for t in cfg.required_tokens(modalities, masked) if tokenizer.token_to_id(t) is None]
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
            tokenizer.token_to_id(t) for t in (cfg.pad, cfg.bos, cfg.eos, UNK, cfg.mask))
        self.special_ids = torch.tensor(sorted(tokenizer.get_added_tokens_decoder()), dtype=torch.long)
        """Ids of every special token (padding, bos/eos, the mask, the span markers, a loaded file's own)."""
        self.overflow = Overflow(cfg.overflow, "tokenizers.text.max_len")

    def markers(self, modality: str) -> tuple[int, int]:
        """Ids of the tokens that open and close a span of ``modality``."""
        ids = tuple(self.hf.token_to_id(token) for token in marker_tokens(modality))
        if None in ids:
            raise DataError(f"the text tokenizer has no span markers for modality {modality!r} (it was made for "
                            f"another set of modalities)")
        return ids

    def span_layout(self, modality: str) -> tuple[tuple[int, int] | None, int]:
        """(the ids of the markers around a span of ``modality``, or None without markers; the id its slots
        hold): the markers and padding, or (``span_markers: false``) the modality's token in every slot."""
        if self.cfg.span_markers:
            return self.markers(modality), self.pad_id
        slot = self.hf.token_to_id(marker_tokens(modality)[0])
        if slot is None:
            raise DataError(f"the text tokenizer has no {marker_tokens(modality)[0]} token for {modality} slots")
        return None, slot

    @classmethod
    def train(cls, texts: Iterable[str], cfg: TextTokenizerConfig, modalities: tuple[str, ...] = ()) -> "TextTokenizer":
        """Learn merges from ``texts``; its special tokens are the built-in ones (fixed ids) and the markers of the
        plugin ``modalities``."""
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                      special_tokens=cfg.special_tokens(modalities), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf, cfg, modalities)

    @classmethod
    def load(cls, path: str | Path, max_len: int | None = None, cfg: TextTokenizerConfig = TextTokenizerConfig(),
             modalities: tuple[str, ...] = (), masked: bool = False) -> "TextTokenizer":
        """The ``tokenizer.json`` at ``path`` with ``cfg``'s settings (``max_len``, when given, overrides cfg's)."""
        if max_len is not None:
            cfg = replace(cfg, max_len=max_len)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read the tokenizer ({err})") from None
        return cls.from_json(text, cfg, str(path), modalities, masked)

    @classmethod
    def from_json(cls, text: str, cfg: TextTokenizerConfig, where: str, modalities: tuple[str, ...] = (),
                  masked: bool = False) -> "TextTokenizer":
        """A ``tokenizer.json``'s contents (a file's, a checkpoint's or an export's: ``where``) with ``cfg``'s
        settings."""
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as err:  # the HF loader raises bare Exception on bad JSON
            raise DataError(f"{where}: not a loadable tokenizer.json ({err})") from None
        return cls(hf, cfg, modalities, masked)

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
