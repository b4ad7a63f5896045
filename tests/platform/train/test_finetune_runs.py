"""Fine-tuning under every ZeRO stage (2 processes): init_from, frozen backbone, gradual unfreezing and LoRA,
the memory planner against what each rank measured, and LoRA folded into the exported weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from polytrain.config import load_config
from polytrain.job import Job
from polytrain.platform.data.builtin import task_manifests
from polytrain.platform.data.datasets import build_datasets
from polytrain.platform.distributed.memory_planner import Option, estimate
from polytrain.platform.observe.meters import GIB
from polytrain.platform.train.evaluate import evaluate
from tests.helpers import polytrain, trained_run
from tests.platform.runs import metric

pytestmark = pytest.mark.slow

PLANNED_MODEL = ("model.backbone.dim=384", "model.backbone.n_heads=6", "model.backbone.encoder_layers=3",
                 "model.backbone.decoder_layers=3", "engine.bucket_size=1000000")
"""About 10M parameters: the states dwarf everything else a rank allocates."""
FINETUNE_RECIPE = """
model:
  backbone: {dim: 384, n_heads: 6, encoder_layers: 3, decoder_layers: 3, mlp_ratio: 2.0}
tokenizers:
  text: {vocab_size: 512, max_len: 32}
  audio: {n_mels: 32, patch_mels: 16, patch_frames: 16, max_seconds: 2.0}
data:
  tasks:
    audio_to_text: {head: encoder_decoder, source: audio, train: "builtin:spoken_digits/train",
                    val: "builtin:spoken_digits/val", batch_size: 2, max_val_samples: 8}
    text_lm: {head: decoder_only, train: "builtin:stdlib/train", val: "builtin:stdlib/val", batch_size: 2,
              seq_len: 32, max_val_samples: 8}
train: {steps: 3, lr: 3.0e-3, warmup_steps: 1, eval_batch_size: 16, save_every: 1}
engine: {bucket_size: 1000000}
finetune:
  freeze: ["backbone.*"]
  freeze_until: {"backbone.decoder.*": 3}
  lora: {rank: 4, alpha: 16.0, targets: ["*.attn.qkv", "*.mlp.fc"]}
tracking: {log_every: 1, progress_bar: false}
"""
"""The planned model's backbone, fine-tuned on spoken digits (new) and the LM (kept); no image task."""


@pytest.fixture(scope="module")
def planned_source(runs):
    """A 10M-parameter model of the tiny recipe after one step: what the fine-tuning runs start from."""
    return runs.train("planned_source", *PLANNED_MODEL, "train.steps=1")


@pytest.fixture(scope="module")
def finetune_runs(runs, planned_source):
    """Fine-tuning under each ZeRO stage (2 processes): audio is new, the image task is gone, the backbone is
    frozen but for LoRA adapters, and the decoder unfreezes at step 3. Stage 2 runs in bf16."""
    recipe_file = runs.root / "finetune.yaml"
    recipe_file.write_text(FINETUNE_RECIPE)
    return {stage: runs.train(f"finetune{stage}", f"engine.zero_stage={stage}", f"finetune.init_from={planned_source}",
                              f"engine.precision={'bf16' if stage == 2 else 'fp32'}", procs=2, recipe=recipe_file)
            for stage in (0, 1, 2, 3)}


def checkpoint_weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_finetune_freezes_unfreezes_and_trains_adapters_under_every_stage(finetune_runs, planned_source, stage):
    run = finetune_runs[stage]
    source = load_file(str(planned_source / "checkpoints" / "step_00000001" / "model.safetensors"))
    report = json.loads((run / "init_from.json").read_text())
    assert sorted(report["ignored"]) == sorted(n for n in source if n.startswith("embedders.image."))
    assert {n for n in report["new"] if ".lora_" not in n} == {n for n in report["new"] if n.startswith("embedders.audio.")}
    assert sum(".lora_" in n for n in report["new"]) == 2 * 2 * 6  # (a, b) x (qkv, fc) x 6 blocks
    steps = {s: checkpoint_weights(run, s) for s in (1, 2, 3)}
    for name in report["loaded"]:
        unfreezes = name.startswith("backbone.decoder.") and not name.endswith((".attn.qkv.weight", ".attn.qkv.bias",
                                                                                 ".mlp.fc.weight", ".mlp.fc.bias"))
        if not name.startswith("backbone."):
            continue
        assert torch.equal(steps[2][name], source[name].to(steps[2][name].dtype)), name  # loaded, not yet trained
        if not unfreezes:
            assert torch.equal(steps[3][name], steps[2][name]), name
        elif steps[3][name].dim() >= 2:  # bf16 would round a 1e-3 step of a norm weight near 1 away
            assert not torch.equal(steps[3][name], steps[2][name]), name  # the decoder trains from step 3
    adapter = "backbone.encoder.blocks.0.attn.qkv.lora_b"
    assert not torch.equal(steps[1][adapter], steps[3][adapter])  # adapters train inside the frozen backbone
    assert not torch.equal(steps[1]["embedders.audio.proj.weight"], steps[3]["embedders.audio.proj.weight"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_planner_matches_measured_state_memory(finetune_runs, stage):
    """The planner's parameters + gradients + optimizer states against what each rank measured at its first step,
    with frozen parameters, adapters and (stage 2) bf16 counted."""
    run = finetune_runs[stage]
    measured = max(metric(run, "memory/states_gib_max").values()) * GIB
    job = Job.of_run(run)  # its config with LoRA off: count the adapters in as the run had them
    cfg = load_config(run / "config.yaml")
    n_params, n_trainable = job.parameter_counts(cfg)
    assert n_trainable < n_params / 2  # the frozen backbone really is most of the model
    planned = estimate(cfg, Option(stage), 2, n_params, n_trainable, activations=0).states
    assert abs(measured / planned - 1) <= 0.15, f"measured {measured / GIB:.3f} GiB, planned {planned / GIB:.3f} GiB"


def test_export_folds_lora_into_the_weights(finetune_runs, tmp_path):
    run = finetune_runs[3]
    out = tmp_path / "merged.safetensors"
    proc = polytrain("export", run, "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg, tokenizers, model = trained_run(out)
    assert cfg.finetune.lora.rank == 0 and not any(".lora_" in name for name in model.state_dict())
    trained = checkpoint_weights(run, 3)
    layer = "backbone.decoder.blocks.1.mlp.fc"
    want = trained[f"{layer}.weight"] + 4.0 * trained[f"{layer}.lora_b"] @ trained[f"{layer}.lora_a"]  # alpha 16 / 4
    assert torch.allclose(model.state_dict()[f"{layer}.weight"], want, atol=1e-6)
    results = evaluate(model, cfg.data.tasks, build_datasets(cfg, "val", tokenizers, task_manifests(cfg)), tokenizers["text"],
                       torch.device("cpu"), cfg.train.eval_batch_size)
    for task, metrics in json.loads((run / "eval.json").read_text()).items():
        for key, value in metrics.items():
            assert results[task][key] == pytest.approx(value, rel=1e-5, abs=1e-4), (task, key)  # perplexity ~1e3
