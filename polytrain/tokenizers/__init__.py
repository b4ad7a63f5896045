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

and configure it under ``tokenizers.plugins.<name>`` in the recipe.  The config sections and the registry
live in ``config.py`` (torch-free, read by the config loader); the tokenizers in ``text.py``, ``image.py``
and ``audio.py``.
"""

