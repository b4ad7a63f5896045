"""Modality tokenizers: raw sample -> ``polytrain.tokens.Tokens``. No module here holds trainable weights.

This package is ``polytrain.tokenizers``; ``import tokenizers`` still means the
Hugging Face library, which ``text.py`` builds on.
"""

from dataclasses import dataclass, field

from polytrain.registry import Registry
from polytrain.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
from polytrain.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from polytrain.tokenizers.text import TextTokenizer, TextTokenizerConfig

TOKENIZERS: Registry[type] = Registry("modality")
"""Tokenizer class by modality name."""
TOKENIZERS.register("text")(TextTokenizer)
TOKENIZERS.register("image")(ImageTokenizer)
TOKENIZERS.register("audio")(AudioTokenizer)


@dataclass(frozen=True)
class TokenizersConfig:
    """One section per modality."""

    text: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    image: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    audio: AudioTokenizerConfig = field(default_factory=AudioTokenizerConfig)


def build_patch_tokenizer(modality: str, cfg: TokenizersConfig):
    """The tokenizer of a modality whose tokenizer needs no training (everything but text)."""
    return TOKENIZERS.get(modality)(getattr(cfg, modality))
