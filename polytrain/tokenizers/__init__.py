"""Modality tokenizers: raw sample -> ``polytrain.tokens.Tokens``. No module here holds trainable weights.

This package is ``polytrain.tokenizers``; ``import tokenizers`` still means the
Hugging Face library, which ``text.py`` builds on.

A tokenizer is a class with ``modality`` (its name), ``config_class`` (a frozen
dataclass, its config section), ``__init__(cfg)``, ``__call__(sample) ->
Tokens`` and ``embed_spec() -> EmbedSpec``.  One that augments training data
also has ``augments`` (true when configured to) and takes ``augment=True`` in
``__call__``, which the platform passes for training samples only.

Third-party packages add one for a new modality through an entry point in the
``polytrain.tokenizers`` group::

    [project.entry-points."polytrain.tokenizers"]
    video = "mypkg.video:VideoTokenizer"

and configure it under ``tokenizers.plugins.<name>`` in the recipe.
"""

from dataclasses import dataclass, field
from typing import Any

from polytrain.errors import ConfigError
from polytrain.registry import Registry
from polytrain.tokenizers.audio import AudioTokenizer, AudioTokenizerConfig
from polytrain.tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from polytrain.tokenizers.text import TextTokenizer, TextTokenizerConfig

ENTRY_POINT_GROUP = "polytrain.tokenizers"
TOKENIZERS: Registry[type] = Registry("modality", group=ENTRY_POINT_GROUP)
"""Tokenizer class by modality name: the built-in ones, then installed plugins."""
TOKENIZERS.register("text")(TextTokenizer)
TOKENIZERS.register("image")(ImageTokenizer)
TOKENIZERS.register("audio")(AudioTokenizer)
BUILT_IN = ("text", "image", "audio")

PluginValue = str | int | float | bool


@dataclass(frozen=True)
class TokenizersConfig:
    """One section per modality."""

    text: TextTokenizerConfig = field(default_factory=TextTokenizerConfig)
    image: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    audio: AudioTokenizerConfig = field(default_factory=AudioTokenizerConfig)
    plugins: dict[str, dict[str, PluginValue]] = field(default_factory=dict)
    """Config of plugin tokenizers by modality name: keys of that tokenizer's ``config_class``."""

    def check(self) -> None:
        for name in self.plugins:
            if name in BUILT_IN:
                raise ConfigError(f"plugins.{name}", self.plugins[name], f"{name} is built in; configure it under "
                                                                         f"tokenizers.{name}")
            if name not in TOKENIZERS:
                raise ConfigError(f"plugins.{name}", self.plugins[name],
                                  f"no tokenizer of that name is installed; known: {', '.join(TOKENIZERS.names())}")
            self.section(name)

    def section(self, modality: str) -> Any:
        """The config object of ``modality``'s tokenizer."""
        if modality in BUILT_IN:
            return getattr(self, modality)
        from polytrain.config import from_dict  # the loader imports this module: import it only when used

        return from_dict(TOKENIZERS.get(modality).config_class, self.plugins.get(modality, {}), f"plugins.{modality}")


def build_patch_tokenizer(modality: str, cfg: TokenizersConfig):
    """The tokenizer of a modality whose tokenizer needs no training (everything but text)."""
    cls = TOKENIZERS.get(modality)
    if cls is TextTokenizer:
        raise ConfigError("modality", modality, "text is trained or loaded: TextTokenizer.train / .load")
    return cls(cfg.section(modality))
