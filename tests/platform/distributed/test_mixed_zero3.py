"""ZeRO-3 with ranks whose micro-batches hold different heads and segment mixes, at a size where DeepSpeed
really partitions the weights (tensors above stage3_param_persistence_threshold, 1e5 elements): no hang."""

import json

import pytest
from safetensors.torch import load_file

from polytrain.platform.data.builtin import resolve_manifest
from tests.platform.runs import losses, samples

pytestmark = pytest.mark.slow

PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's default stage3_param_persistence_threshold: smaller tensors stay whole on every rank."""

RECIPE = """
model:
  backbone: {{dim: 256, n_heads: 4, encoder_layers: 1, decoder_layers: 1, mlp_ratio: 2.0}}
tokenizers:
  text: {{vocab_size: 512, max_len: 64}}
  image: {{size: 8, patch_size: 4, channels: 1}}
  audio: {{n_mels: 32, patch_mels: 16, patch_frames: 8, max_seconds: 1.0}}
data:
  mixing: sampled
  tasks:
    digit_class: {{head: encoder_classifier, source: image, classes: [zero, one, two, three, four, five, six, seven,
                  eight, nine], train: "builtin:digits_image/train", val: "builtin:digits_image/val", batch_size: 1,
                  max_val_samples: 4}}
    mixed_qa: {{head: decoder_only, source: [image, audio], train: {mixed}, val: {mixed}, batch_size: 2,
               seq_len: 48, packing: true, max_val_samples: 4}}
train: {{steps: 8, lr: 1.0e-3, warmup_steps: 2, eval_batch_size: 4}}
engine: {{zero_stage: 3}}
tracking: {{log_every: 1, progress_bar: false}}
"""


TOWERS = """
  towers:
    image: {{dim: 256, layers: 1, n_heads: 4, mlp_width: 512, projector: linear}}
    audio: {{stem: conv, cls_token: false, prefix_positions: false, dim: 256, layers: 1, n_heads: 4, mlp_width: 512,
            projector: linear}}
"""
"""Image and audio towers (a ViT's, Whisper's) instead of the patch embedders: ranks whose micro-batches hold no
image or no clip run them on stand-ins."""


@pytest.mark.parametrize("towers", [False, True], ids=["patch_embedders", "towers"])
def test_ranks_with_different_heads_and_modalities_stay_in_step_under_zero3(runs, data_cache, tmp_path, towers):
    image_manifest = resolve_manifest("builtin:digits_image_qa/train", data_cache)
    images = [line.replace('"image": "', f'"image": "{image_manifest.parent}/')  # absolute: the manifest moves
              for line in image_manifest.read_text().splitlines()]
    clips = resolve_manifest("builtin:spoken_digits_qa/train", data_cache).read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"  # image questions and spoken ones, interleaved: batches hold either or both
    mixed.write_text("\n".join(line for pair in zip(images, clips) for line in pair) + "\n")
    recipe = tmp_path / "mixed.yaml"
    text = RECIPE.format(mixed=mixed)
    if towers:
        text = text.replace("mlp_ratio: 2.0}\n", "mlp_ratio: 2.0}" + TOWERS.format()).replace(
            "patch_mels: 16, patch_frames: 8", "patch_mels: 32, patch_frames: 2").replace("seq_len: 48", "seq_len: 64")
    recipe.write_text(text)
    run = runs.train("mixed", procs=2, recipe=recipe)
    rank0, rank1 = samples(run, 0), samples(run, 1)
    tasks_differ = [s for s in rank0 if set(rank0[s]) != set(rank1[s])]
    assert tasks_differ, "the seed should give a step where the ranks hold different tasks (heads)"
    modality = {line["id"]: next(iter(line["segments"][0])) for line in map(json.loads, images + clips)}
    mixes = {tuple(sorted({modality[i] for i in r.get(s, {}).get("mixed_qa", [])})) for r in (rank0, rank1)
             for s in r}
    assert {("image",), ("audio",)} & mixes and len(mixes) > 1  # ranks saw different segment mixes
    state = json.loads((run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["zero_stage"] == 3 and len(set(state["replica_sha256"])) == 1
    curve = losses(run)
    assert len(curve) == 8 and all(v == v for v in curve.values())  # every step ran, none gave NaN
    weights = load_file(str(run / "checkpoints" / "step_00000008" / "model.safetensors"))
    big = [name for name, t in weights.items() if t.numel() > PERSISTENCE_THRESHOLD]
    assert any(".attn.qkv." in name for name in big)  # partitioned across the ranks, not kept whole on each
    if towers:
        assert {"embedders.image.tower.blocks.0.attn.qkv.weight", "embedders.audio.tower.blocks.0.attn.qkv.weight"} <= \
            set(big)
