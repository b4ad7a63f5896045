"""The recipe builds every tokenizer from its own config section."""

import pytest

from polytrain.config import load_config
from polytrain.errors import DataError
from polytrain.platform import recipe
from polytrain.tokenizers.text import TextTokenizer, TextTokenizerConfig

TASK = ["data.tasks.t.head=encoder_decoder", "data.tasks.t.source=image", "data.tasks.t.train=m.jsonl",
        "data.tasks.t.val=m.jsonl"]


def test_tokenizers_get_every_key_of_their_sections(tmp_path):
    cfg = load_config(None, TASK + ["data.tasks.t.max_target_len=4", "tokenizers.text.max_len=6",
                                    "tokenizers.text.overflow=error", "tokenizers.text.pad_to_multiple=8",
                                    "tokenizers.image.size=16", "tokenizers.image.patch_size=8",
                                    "tokenizers.image.channels=1"])
    trained = TextTokenizer.train(["seven eight nine"] * 10, TextTokenizerConfig(vocab_size=300))
    tokenizers = recipe.build_tokenizers(cfg, trained.save(tmp_path))
    text, image = tokenizers["text"], tokenizers["image"]
    assert text.cfg == cfg.tokenizers.text and image.cfg == cfg.tokenizers.image
    with pytest.raises(DataError, match=r"\d+ tokens exceeds tokenizers.text.max_len=6 \(overflow=error"):
        text("seven eight nine seven eight nine")
    assert text.batch(["seven", "eight nine"]).values.shape[1] == 8  # padded to a multiple of 8
    assert image.embed_spec().input_dim == 1 * 8 * 8 and image.embed_spec().grid == (2, 2)
