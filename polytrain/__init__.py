"""polytrain: one shared Transformer backbone trained on text, images and audio."""

__version__ = "0.1.0"
