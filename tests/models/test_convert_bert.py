"""Hugging Face BERT (masked LM, sequence classification) in and out: logits on a padded batch, training, export."""

import pytest
import torch

from polytrain.models.convert.external import read_external
from polytrain.models.convert.rules import ConversionError
from polytrain.models.heads import text_segment
from polytrain.tokens import TaskBatch
from tests.models.convert_checks import TOLERANCE, exported, imported, max_diff, perturbed, trained

transformers = pytest.importorskip("transformers")

SHAPE = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=32, type_vocab_size=2)
CASES = {
    "masked_lm": ("BertForMaskedLM", {}, "AutoModelForMaskedLM"),
    "masked_lm_untied": ("BertForMaskedLM", dict(tie_word_embeddings=False), "AutoModelForMaskedLM"),
    "classifier": ("BertForSequenceClassification", dict(num_labels=3), "AutoModelForSequenceClassification"),
}


def bert(architecture: str, **changes):
    torch.manual_seed(0)
    return perturbed(getattr(transformers, architecture)(transformers.BertConfig(**{**SHAPE, **changes})))


@pytest.mark.parametrize("case", CASES)
def test_round_trip_keeps_the_logits(case, tmp_path):
    architecture, changes, auto = CASES[case]
    hf = bert(architecture, **changes)
    model = imported(hf, tmp_path / "library", "task")
    g = torch.Generator().manual_seed(2)
    ids_BT = torch.randint(5, 100, (2, 16), generator=g)
    inputs = text_segment(ids_BT)
    inputs.mask[1, 11:] = False
    labels = ids_BT if architecture == "BertForMaskedLM" else torch.tensor([0, 2])
    batch = TaskBatch(inputs, labels)
    mask = inputs.mask if architecture == "BertForMaskedLM" else None  # per token, or per sample

    def logits(library_model=None):
        with torch.no_grad():
            if library_model is not None:
                return library_model(ids_BT, attention_mask=inputs.mask.long()).logits
            return model.heads["task"](model, batch)

    before = logits()
    assert max_diff(before, logits(hf), mask) <= TOLERANCE
    trained(model, "task", batch)
    after = logits()
    assert max_diff(after, before, mask) > 1e-3
    back = exported(model, "task", architecture, tmp_path / "exported", getattr(transformers, auto))
    assert max_diff(after, logits(back), mask) <= TOLERANCE


def test_the_pretraining_files_pooler_and_next_sentence_head_are_skipped(tmp_path):
    """bert-base-uncased's file holds BertForPreTraining's tensors (and, from older transformers, a position
    buffer); its config says BertForMaskedLM."""
    from safetensors.torch import load_file, save_file

    pretraining = bert("BertForPreTraining")
    pretraining.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace("BertForPreTraining", "BertForMaskedLM")
    (tmp_path / "config.json").write_text(config)
    state = load_file(tmp_path / "model.safetensors")
    assert any(name.startswith(("bert.pooler.", "cls.seq_relationship.")) for name in state)
    state["bert.embeddings.position_ids"] = torch.arange(32)[None]  # as older transformers saved it
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = read_external(tmp_path).build("mlm")
    assert torch.equal(model.embedders["text"].output_bias, pretraining.cls.predictions.bias)


def test_settings_polytrain_cannot_follow_are_refused_naming_the_key(tmp_path):
    bert("BertForMaskedLM", hidden_act="gelu_new").save_pretrained(tmp_path / "tanh")
    with pytest.raises(ConversionError, match="hidden_act='gelu_new'.*masked-LM transform"):
        read_external(tmp_path / "tanh")
    bert("BertForSequenceClassification", problem_type="multi_label_classification").save_pretrained(tmp_path / "multi")
    with pytest.raises(ConversionError, match="problem_type='multi_label_classification'"):
        read_external(tmp_path / "multi")
