"""``polytrain generate``'s choices before any model runs: which task generates, and the decoding settings."""

import pytest

from polytrain.config import load_config
from polytrain.config.model import DecodingConfig
from polytrain.errors import ConfigError
from polytrain.platform.train.generate import generating_task, settings
from tests.helpers import REPO


def test_the_only_generating_task_or_the_one_reading_the_sample_is_picked_and_a_classifier_run_is_refused():
    assert generating_task(load_config(REPO / "configs" / "tiny.yaml"), "image_to_text") == "image_to_text"
    with pytest.raises(ConfigError, match="the run has 2 tasks whose heads generate text"):
        generating_task(load_config(REPO / "configs" / "tiny.yaml"), None)
    vlm = load_config(REPO / "configs" / "vlm.yaml")  # a sample's modalities pick the one task that reads them
    assert [generating_task(vlm, None, {m}) for m in ("image", "audio")] == ["image_qa", "audio_qa"]
    with pytest.raises(ConfigError, match="the run has 2 tasks whose heads generate text"):
        generating_task(vlm, None, set())  # text alone: both read more than that
    with pytest.raises(ConfigError, match="trained without a head that generates text"):
        generating_task(load_config(REPO / "configs" / "classify.yaml"), None)
    with pytest.raises(ConfigError, match="head encoder_classifier does not generate text"):
        generating_task(load_config(REPO / "configs" / "classify.yaml"), "image_class")


def test_decoding_overrides_are_checked_like_the_config():
    decoding, tokens = settings(DecodingConfig(), ["strategy=beam", "decoding.num_beams=3", "max_new_tokens=9"], 4)
    assert (decoding.strategy, decoding.num_beams, tokens) == ("beam", 3, 9)
    assert settings(DecodingConfig(), [], 4)[1] == 5  # max_target_len + eos
    with pytest.raises(ConfigError, match=r"model.heads.decoding.top_p=0.0: must be in \(0, 1\]"):
        settings(DecodingConfig(), ["top_p=0"], 4)
    with pytest.raises(ConfigError, match="model.heads.decoding.beams"):
        settings(DecodingConfig(), ["beams=3"], 4)
