"""Numeric parity with timm and Hugging Face (fp32, CPU, random init, no downloads) and export round trips."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from polytrain.models import convert, presets
from polytrain.models.convert import ConversionError
from polytrain.models.heads import text_segment
from polytrain.tokenizers.image import patchify
from polytrain.tokens import Segment, TaskBatch

TOLERANCE = 1e-5


def round_trip_file(state: dict, tmp_path) -> dict:
    path = tmp_path / "exported.safetensors"
    save_file(state, str(path))
    return load_file(str(path))


@pytest.fixture(scope="module")
def timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()


@pytest.fixture(scope="module")
def vit(timm_vit):
    model = presets.PRESETS.get("vit_tiny_patch16_224").build().eval()
    convert.import_timm_vit(model, timm_vit.state_dict(), "classify")
    return model


def images(batch: int = 2) -> tuple[torch.Tensor, Segment]:
    pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return pixels, Segment.collate([patchify(p, 16) for p in pixels])


@torch.no_grad()
def test_vit_tiny_features_and_logits_equal_timm(timm_vit, vit):
    pixels, patches = images()
    features = vit.backbone.encode(vit.embed(patches))
    want = timm_vit.forward_features(pixels)
    assert features.shape == want.shape == (2, 197, 192)
    assert (features - want).abs().max() <= TOLERANCE
    logits = vit.heads["classify"](vit, TaskBatch(patches, torch.zeros(2, dtype=torch.long)))
    assert (logits - timm_vit(pixels)).abs().max() <= TOLERANCE


def test_vit_export_round_trips_through_safetensors(timm_vit, vit, tmp_path):
    import timm

    exported = round_trip_file(convert.export_timm_vit(vit, "classify"), tmp_path)
    original = timm_vit.state_dict()
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    fresh = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    fresh.load_state_dict(exported, strict=True)
    pixels, _ = images(1)
    with torch.no_grad():
        assert torch.equal(fresh(pixels), timm_vit(pixels))


GPT2 = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)


@pytest.fixture(scope="module")
def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()


def our_gpt2(hf):
    model = presets.gpt2("tiny GPT-2", 64, 2, 4, vocab=100, positions=32).build().eval()
    convert.import_hf_gpt2(model, hf.state_dict())
    return model


@torch.no_grad()
def test_gpt2_logits_equal_hugging_face_with_padding(hf_gpt2):
    model = our_gpt2(hf_gpt2)
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(2))
    inputs = text_segment(ids)
    inputs.mask[1, 13:] = False
    ours = model.heads["lm"](model, TaskBatch(inputs, ids))
    theirs = hf_gpt2(ids, attention_mask=inputs.mask.long()).logits
    assert (ours[inputs.mask] - theirs[inputs.mask]).abs().max() <= TOLERANCE
    assert ours.std() > 0.1  # not a degenerate comparison


def test_gpt2_export_round_trips_through_safetensors(hf_gpt2, tmp_path):
    import transformers

    exported = round_trip_file(convert.export_hf_gpt2(our_gpt2(hf_gpt2)), tmp_path)
    fresh = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()
    fresh.load_state_dict(exported, strict=True)
    original = hf_gpt2.state_dict()
    assert all(torch.equal(exported[k], original[k]) for k in exported)
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, hf_gpt2(ids).logits)


BART = dict(vocab_size=100, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=32)


def hf_bart_model(**changes):
    """A random BART with one text position table for both stacks, as polytrain keeps it."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.BartForConditionalGeneration(transformers.BartConfig(**{**BART, **changes})).eval()
    with torch.no_grad():
        hf.model.decoder.embed_positions.weight.copy_(hf.model.encoder.embed_positions.weight)
    return hf


@pytest.fixture(scope="module")
def hf_bart():
    pytest.importorskip("transformers")
    return hf_bart_model()


def imported_bart(hf):
    model = presets.bart("tiny BART", 64, 2, 3, 4, 128, vocab=100, positions=32).build().eval()
    convert.import_hf_bart(model, hf.state_dict())
    return model


@torch.no_grad()
def test_bart_logits_equal_hugging_face_under_teacher_forcing(hf_bart):
    model = imported_bart(hf_bart)
    g = torch.Generator().manual_seed(3)
    source_ids, target_ids = torch.randint(3, 100, (2, 14), generator=g), torch.randint(3, 100, (2, 9), generator=g)
    source, target = text_segment(source_ids), text_segment(target_ids)
    source.mask[1, 10:] = False
    target.mask[1, 6:] = False
    ours = model.heads["translate"](model, TaskBatch(target, target_ids, source))
    theirs = hf_bart(input_ids=source_ids, attention_mask=source.mask.long(), decoder_input_ids=target_ids,
                          decoder_attention_mask=target.mask.long()).logits
    assert (ours[target.mask] - theirs[target.mask]).abs().max() <= TOLERANCE
    assert ours.std() > 0.05


def test_bart_export_round_trips_through_safetensors(hf_bart, tmp_path):
    import transformers

    model = imported_bart(hf_bart)
    exported = round_trip_file(convert.export_hf_bart(model), tmp_path)
    fresh = transformers.BartForConditionalGeneration(transformers.BartConfig(**BART))
    fresh.load_state_dict(exported, strict=True)
    again = imported_bart(fresh.eval())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    ids = torch.randint(3, 100, (1, 7))
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(input_ids=ids, decoder_input_ids=ids).logits,
                              hf_bart(input_ids=ids, decoder_input_ids=ids).logits, atol=TOLERANCE)


def test_mismatches_name_the_tensor(hf_gpt2, hf_bart):
    state = hf_gpt2.state_dict()
    wrong_length = presets.gpt2("t", 64, 2, 4, vocab=100, positions=16).build()
    with pytest.raises(ConversionError, match=r"transformer\.wpe\.weight \(32, 64\).*embedders\.text\.position"):
        convert.import_hf_gpt2(wrong_length, state)
    model = presets.gpt2("t", 64, 2, 4, vocab=100, positions=32).build()
    with pytest.raises(ConversionError, match=r"no 'transformer\.h\.1\.ln_2\.bias'"):
        convert.import_hf_gpt2(model, {k: v for k, v in state.items() if k != "transformer.h.1.ln_2.bias"})
    with pytest.raises(ConversionError, match="no place for: \\['extra'\\]"):
        convert.import_hf_gpt2(model, {**state, "extra": torch.zeros(1)})
    untied = {**state, "lm_head.weight": state["lm_head.weight"] + 1}
    with pytest.raises(ConversionError, match="lm_head.weight differs from transformer.wte.weight"):
        convert.import_hf_gpt2(model, untied)
    bart_state = dict(hf_bart.state_dict())
    bart_state["model.decoder.embed_positions.weight"] = bart_state["model.decoder.embed_positions.weight"] + 1
    with pytest.raises(ConversionError, match="decoder.embed_positions.weight differs"):
        convert.import_hf_bart(imported_bart(hf_bart), bart_state)
    wider_decoder = hf_bart_model(decoder_ffn_dim=96)  # polytrain's one block width serves both stacks
    with pytest.raises(ConversionError, match=r"decoder\.layers\.0\.fc1\.weight \(96, 64\)"):
        imported_bart(wider_decoder)
