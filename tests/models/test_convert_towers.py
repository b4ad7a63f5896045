"""Towers from the libraries' own models: each tower's features against timm's and transformers' forward, a LLaVA
composition's logits against ``LlavaForConditionalGeneration`` before and after export, Whisper's logits and
greedy transcript against ``WhisperForConditionalGeneration`` (fp32, CPU; models built locally, random)."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from polytrain.models.convert.external import import_weights, read_external, write_external
from polytrain.models.convert.files import TokenizerFiles
from polytrain.models.convert.rules import ConversionError
from polytrain.models.heads import text_segment
from polytrain.tokenizers.audio import patchify as mel_tokens
from polytrain.tokenizers.image import patchify
from polytrain.tokens import Segment, Spans, TaskBatch
from tests.models.convert_checks import TOLERANCE, max_diff, perturbed, trained

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

LOGITS_TOLERANCE = 1e-4
"""A composition's logits (tower, projector, LM) against the library's."""
TIMM_ARGS = dict(embed_dim=64, depth=3, num_heads=4, img_size=32, patch_size=8, num_classes=0)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=16,
              patch_size=8, num_channels=3)
TEXT = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100)
IMAGE_TOKEN = 99
WHISPER = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
               encoder_ffn_dim=48, decoder_ffn_dim=48, vocab_size=100, num_mel_bins=16, max_source_positions=30,
               max_target_positions=20, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def patches(pixels: torch.Tensor, patch: int) -> Segment:
    return Segment.collate([patchify(p, patch) for p in pixels])


@pytest.mark.parametrize("name", ["vit_base_patch16_clip_224", "vit_base_patch16_clip_quickgelu_224",
                                  "vit_base_patch16_siglip_224", "vit_small_patch14_dinov2",
                                  "vit_small_patch14_reg4_dinov2", "vit_small_patch16_224"])
def test_timm_towers_give_timms_features(name, tmp_path):
    """forward_features without the prefix tokens; a plain ViT classifier read as a tower too."""
    torch.manual_seed(0)
    reference = perturbed(timm.create_model(name, pretrained=False, **TIMM_ARGS))
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    checkpoint = read_external(tmp_path / "vit.safetensors", timm_model=name, model_args=TIMM_ARGS)
    model = checkpoint.as_towers({"image"}).build("features").eval()
    assert "image" in model.cfg.towers and not model.task_heads
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.embed(patches(pixels, 8)).x_BLE
        theirs = reference.forward_features(pixels)[:, reference.num_prefix_tokens:]
    assert max_diff(ours, theirs) <= TOLERANCE


def test_a_timm_tower_reads_another_grid_through_timms_interpolated_positions(tmp_path):
    torch.manual_seed(0)
    args = {**TIMM_ARGS, "dynamic_img_size": True}
    reference = perturbed(timm.create_model("vit_base_patch16_clip_224", pretrained=False, **args))
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    model = read_external(tmp_path / "vit.safetensors", timm_model="vit_base_patch16_clip_224",
                          model_args=args).build("features").eval()
    for side in (48, 24):  # 6x6 and 3x3 patches from a 4x4 table: up and down
        pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(side))
        with torch.no_grad():
            ours = model.embed(patches(pixels, 8)).x_BLE
            theirs = reference.forward_features(pixels)[:, 1:]
        assert max_diff(ours, theirs) <= TOLERANCE


def test_timm_tower_features_of_an_earlier_layer_are_timms_intermediates(tmp_path):
    torch.manual_seed(0)
    reference = perturbed(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **TIMM_ARGS))
    save_file(reference.state_dict(), str(tmp_path / "vit.safetensors"))
    checkpoint = read_external(tmp_path / "vit.safetensors", timm_model="vit_small_patch14_reg4_dinov2",
                               model_args=TIMM_ARGS)
    arch = checkpoint.architecture
    tower = arch.model.towers["image"]
    llava_use = replace(tower, feature_layer=-2, final_norm=False)
    arch = replace(arch, model=replace(arch.model, towers={"image": llava_use}))
    model = arch.build("features")
    import_weights(model, checkpoint.family, arch, "features", checkpoint.state)
    assert len(model.embedders["image"].tower.blocks) == 2  # the last block computes nothing read: not built
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.eval().embed(patches(pixels, 8)).x_BLE
        theirs = reference.forward_intermediates(pixels, indices=[1], norm=False, output_fmt="NLC",
                                                 intermediates_only=True)[0]
    assert max_diff(ours, theirs) <= TOLERANCE


def vision_model(kind: str, full: bool, folder):
    config = getattr(transformers, f"{kind}VisionConfig")(**VISION)
    if full:
        text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, vocab_size=50,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        model = getattr(transformers, f"{kind}Model")(getattr(transformers, f"{kind}Config")(
            vision_config=VISION, text_config=text))
    else:
        model = getattr(transformers, f"{kind}VisionModel")(config)
    perturbed(model).save_pretrained(folder)
    return model


@pytest.mark.parametrize("kind", ["CLIP", "Siglip"])
@pytest.mark.parametrize("full", [False, True])
def test_hf_vision_towers_give_the_vision_models_last_hidden_state(kind, full, tmp_path):
    torch.manual_seed(0)
    reference = vision_model(kind, full, tmp_path)
    checkpoint = read_external(tmp_path)
    assert checkpoint.preprocessing["image"]["size"] == 16 and checkpoint.preprocessing["image"]["patch_size"] == 8
    model = checkpoint.build("features").eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.embed(patches(pixels, 8)).x_BLE
        vision = reference.vision_model if full else reference
        theirs = vision(pixel_values=pixels).last_hidden_state[:, 1 if kind == "CLIP" else 0:]
    assert max_diff(ours, theirs) <= TOLERANCE


def whisper(folder):
    torch.manual_seed(0)
    reference = perturbed(transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**WHISPER)))
    reference.save_pretrained(folder)
    return reference


def mels(frames: list[int]) -> tuple[list[torch.Tensor], Segment]:
    """Random log-mel clips (T, 16) and their audio tokens of 2 frames."""
    clips = [torch.randn(t, 16, generator=torch.Generator().manual_seed(t)) for t in frames]
    return clips, Segment.collate([mel_tokens(c, 16, 2) for c in clips])


def by_hand(encoder, clip: torch.Tensor) -> torch.Tensor:
    """transformers' Whisper encoder modules over a clip shorter than its 30 positions (its forward takes
    exactly 2 x max_source_positions frames): the first rows of its position table, no padding."""
    h = F.gelu(encoder.conv2(F.gelu(encoder.conv1(clip.T[None]))))
    h = h.permute(0, 2, 1) + encoder.embed_positions.weight[: h.shape[2]]
    for layer in encoder.layers:
        h = layer(h, None)
    return encoder.layer_norm(h)[0]


def test_whisper_encoder_is_an_audio_tower_full_length_and_short_clips_in_a_padded_batch(tmp_path):
    reference = whisper(tmp_path)
    checkpoint = read_external(tmp_path)
    assert checkpoint.preprocessing["audio"] == dict(frontend="whisper", sample_rate=16000, n_mels=16,
                                                     frame_length_ms=25.0, frame_shift_ms=10.0, patch_mels=16,
                                                     patch_frames=2, max_seconds=0.6)
    model = checkpoint.build("asr").eval()
    clips, tokens = mels([60, 60])
    with torch.no_grad():
        ours = model.embed(tokens).x_BLE
        theirs = reference.model.encoder(torch.stack(clips).transpose(1, 2)).last_hidden_state
        assert max_diff(ours, theirs) <= TOLERANCE
        clips, tokens = mels([22, 14])  # 11 and 7 tokens, one padded
        ours = model.embed(tokens)
        for row, clip in enumerate(clips):
            length = len(clip) // 2
            assert ours.valid_BL[row].sum() == length
            assert max_diff(ours.x_BLE[row, :length], by_hand(reference.model.encoder, clip)) <= TOLERANCE


def test_whisper_logits_and_greedy_transcript_before_and_after_export(tmp_path):
    reference = whisper(tmp_path / "whisper")
    model = read_external(tmp_path / "whisper").build("asr").eval()
    clips, tokens = mels([60, 60])
    features = torch.stack(clips).transpose(1, 2)
    decoder_ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    decoder_ids[:, 0] = WHISPER["decoder_start_token_id"]
    batch = TaskBatch(text_segment(decoder_ids), decoder_ids, tokens)
    for library in (reference, None):
        if library is None:
            trained(model, "asr", batch)
            write_external(model, "asr", "WhisperForConditionalGeneration", tmp_path / "exported",
                           TokenizerFiles("{}", {"bos": ("<s>", 1), "eos": ("</s>", 2), "pad": ("<pad>", 0)}))
            library, info = transformers.WhisperForConditionalGeneration.from_pretrained(
                tmp_path / "exported", output_loading_info=True)
            assert not any(info.values()), info
            library.eval()
        with torch.no_grad():
            ours = model.heads["asr"](model, batch)
            assert max_diff(ours, library(input_features=features, decoder_input_ids=decoder_ids).logits) <= TOLERANCE
            start = torch.full((2, 1), WHISPER["decoder_start_token_id"])
            transcript = model.heads["asr"].generate(model, start, tokens, 8, WHISPER["eos_token_id"])
            theirs = library.generate(input_features=features, max_new_tokens=8, do_sample=False)
        assert torch.equal(transcript, theirs[:, -transcript.shape[1]:]), (transcript, theirs)


def llava(vision_type: str, text_type: str, folder, layer: int = -2):
    torch.manual_seed(0)
    strategy = "default" if vision_type == "clip_vision_model" else "full"
    config = transformers.LlavaConfig(vision_config=dict(model_type=vision_type, **VISION),
                                      text_config=dict(model_type=text_type, **TEXT), image_token_index=IMAGE_TOKEN,
                                      image_seq_length=4, vision_feature_select_strategy=strategy,
                                      vision_feature_layer=layer)
    reference = perturbed(transformers.LlavaForConditionalGeneration(config))
    reference.save_pretrained(folder)
    return reference


def image_questions() -> tuple[torch.Tensor, torch.Tensor, Segment]:
    """Two rows of 10 ids with 4 image tokens at 2..5, their pixels, and the text segment with the image spans."""
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    ids = torch.randint(0, IMAGE_TOKEN - 1, (2, 10), generator=g)
    ids[:, 2:6] = IMAGE_TOKEN
    segment = text_segment(ids)
    segment.spans = {"image": Spans(patches(pixels, 8), torch.tensor([0, 1]), torch.tensor([2, 2]))}
    return pixels, ids, segment


@pytest.mark.parametrize("vision_type, text_type", [("clip_vision_model", "llama"), ("siglip_vision_model", "qwen2"),
                                                    ("clip_vision_model", "mistral")])
def test_llava_logits_before_and_after_export(vision_type, text_type, tmp_path):
    reference = llava(vision_type, text_type, tmp_path / "llava")
    checkpoint = read_external(tmp_path / "llava")
    tower = checkpoint.architecture.model.towers["image"]
    assert (tower.layers, tower.built_layers, tower.projector) == (3, 2, "mlp2x_gelu")
    model = checkpoint.build("vqa").eval()
    pixels, ids, segment = image_questions()
    batch = TaskBatch(segment, ids)
    with torch.no_grad():
        assert max_diff(model.heads["vqa"](model, batch), reference(input_ids=ids, pixel_values=pixels).logits) \
            <= LOGITS_TOLERANCE
    trained(model, "vqa", batch)
    config = write_external(model, "vqa", "LlavaForConditionalGeneration", tmp_path / "exported",
                            TokenizerFiles("{}", {"image": ("<image>", IMAGE_TOKEN), "bos": ("<s>", 1)}))
    assert (config["vision_feature_layer"], config["image_token_index"]) == (-1, IMAGE_TOKEN)
    assert config["vision_config"]["num_hidden_layers"] == 2
    exported, info = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "exported",
                                                                                output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        ours = model.heads["vqa"](model, batch)
        assert max_diff(ours, exported.eval()(input_ids=ids, pixel_values=pixels).logits) <= LOGITS_TOLERANCE


def test_llava_is_read_in_the_layout_of_transformers_modules_too(tmp_path):
    reference = llava("clip_vision_model", "llama", tmp_path / "llava")
    save_file({name: t.contiguous() for name, t in reference.state_dict().items()},
              str(tmp_path / "llava" / "model.safetensors"), metadata={"format": "pt"})
    model = read_external(tmp_path / "llava").build("vqa").eval()
    pixels, ids, segment = image_questions()
    with torch.no_grad():
        ours = model.heads["vqa"](model, TaskBatch(segment, ids))
        assert max_diff(ours, reference(input_ids=ids, pixel_values=pixels).logits) <= LOGITS_TOLERANCE


def test_llava_settings_polytrain_cannot_follow_are_refused_naming_them(tmp_path):
    llava("siglip_vision_model", "llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value, message in (("vision_feature_select_strategy", "default", "drops the first"),
                                ("vision_feature_layer", [-2, -1], "one layer"),
                                ("projector_hidden_act", "relu", "projector_hidden_act='relu'")):
        (tmp_path / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConversionError, match=message):
            read_external(tmp_path)
