"""A run's tokenizers from its config: the text tokenizer from its ``tokenizer.json``, one tokenizer per other
modality the tasks read (built from its config section alone: none of them learns anything)."""

from typing import Any

from polytrain.config import Config
from polytrain.config.registries import TOKENIZERS
from polytrain.config.tokenizers import TokenizersConfig
from polytrain.errors import ConfigError
from polytrain.tokenizers.text import TextTokenizer


def build_patch_tokenizer(modality: str, cfg: TokenizersConfig):
    """The tokenizer of a modality whose tokenizer needs no training (everything but text)."""
    if modality == "text":
        raise ConfigError("modality", modality, "text is trained or loaded: TextTokenizer.train / .load")
    return TOKENIZERS.get(modality)(cfg.section(modality))


def text_tokenizer(cfg: Config, tokenizer_json: str, where: str = "the run's tokenizer.json") -> TextTokenizer:
    """A ``tokenizer.json``'s contents (from ``where``) with ``tokenizers.text``'s settings, plus the special tokens
    the tasks use where it lacks them (a checkpoint's)."""
    return TextTokenizer.from_json(tokenizer_json, cfg.tokenizers.text, where, cfg.data.span_modalities,
                                   cfg.data.masks)


def patch_tokenizers(cfg: Config) -> dict[str, Any]:
    """One tokenizer per non-text modality the tasks read."""
    return {m: build_patch_tokenizer(m, cfg.tokenizers) for m in cfg.data.modalities}
