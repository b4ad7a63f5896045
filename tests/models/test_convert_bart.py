"""Hugging Face BART in and out: teacher-forced logits on padded batches, training, export (fp32, CPU)."""

import pytest
import torch

from polytrain.models.convert.external import read_external
from polytrain.models.convert.rules import ConversionError
from polytrain.models.heads import text_segment
from polytrain.tokens import TaskBatch
from tests.models.convert_checks import TOLERANCE, exported, imported, max_diff, perturbed, trained

transformers = pytest.importorskip("transformers")

BART = dict(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=32)


def bart(**changes):
    torch.manual_seed(0)
    return perturbed(transformers.BartForConditionalGeneration(transformers.BartConfig(**{**BART, **changes})))


@pytest.mark.parametrize("changes", [{}, dict(scale_embedding=True, activation_function="relu")],
                         ids=["bart", "scaled_relu"])
def test_round_trip_keeps_the_teacher_forced_logits(changes, tmp_path):
    hf = bart(**changes)
    assert not torch.equal(hf.model.encoder.embed_positions.weight, hf.model.decoder.embed_positions.weight)
    model = imported(hf, tmp_path / "library", "translate")
    g = torch.Generator().manual_seed(3)
    source_ids, target_ids = torch.randint(3, 100, (2, 14), generator=g), torch.randint(3, 100, (2, 9), generator=g)
    source, target = text_segment(source_ids), text_segment(target_ids)
    source.mask[1, 10:] = False
    target.mask[1, 6:] = False
    batch = TaskBatch(target, target_ids, source)

    def logits(library_model=None):
        with torch.no_grad():
            if library_model is not None:
                return library_model(input_ids=source_ids, attention_mask=source.mask.long(),
                                     decoder_input_ids=target_ids, decoder_attention_mask=target.mask.long()).logits
            return model.heads["translate"](model, batch)

    before = logits()
    assert max_diff(before, logits(hf), target.mask) <= TOLERANCE
    trained(model, "translate", batch)
    after = logits()
    assert max_diff(after, before, target.mask) > 1e-3
    back = exported(model, "translate", "BartForConditionalGeneration", tmp_path / "exported",
                    transformers.AutoModelForSeq2SeqLM)
    assert max_diff(after, logits(back), target.mask) <= TOLERANCE
    assert not back.final_logits_bias.any()


def test_stacks_of_different_shapes_and_a_final_logits_bias_are_refused_by_name(tmp_path):
    bart(decoder_ffn_dim=96).save_pretrained(tmp_path / "wider")
    with pytest.raises(ConversionError, match="decoder_ffn_dim=96 differs from encoder_ffn_dim=128"):
        read_external(tmp_path / "wider")
    hf = bart()
    hf.final_logits_bias.fill_(0.5)
    hf.save_pretrained(tmp_path / "biased")
    with pytest.raises(ConversionError, match="'final_logits_bias' is not zero"):
        read_external(tmp_path / "biased").build("translate")
