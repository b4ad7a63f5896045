"""The engine for real: DeepSpeed ZeRO 0-3 with 1, 2 and 4 gloo processes on the tiny recipe.

Runs go through the CLI; module fixtures share runs between tests (the stage runs feed the
resume and export tests). Losses are compared step by step from each run's metrics.jsonl.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from polytrain.config import load_config
from polytrain.platform import recipe
from polytrain.platform.checkpoint import load_exported
from polytrain.platform.evaluate import evaluate
from polytrain.platform.plan import GIB, Option, count_parameters, estimate
from tests.helpers import REPO, polytrain, read_jsonl

pytestmark = pytest.mark.slow

TINY = REPO / "configs" / "tiny.yaml"
STEPS = 20
DOUBLE = ("data.tasks.image_to_text.batch_size=8", "data.tasks.text_lm.batch_size=4")
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


class Runs:
    """Starts tiny-recipe runs under one folder and reads back what they logged."""

    def __init__(self, root, cache):
        self.root, self.cache, self.port = root, cache, 29600 + os.getpid() % 300

    def train(self, name, *overrides, procs=1, expect_ok=True, recipe=TINY):
        args = ["launch" if procs > 1 else "train", recipe, f"train.out_dir={self.root}", f"train.run_name={name}",
                f"data.cache_dir={self.cache}", "tracking.log_samples=true", *overrides]
        if procs > 1:
            self.port += 1
            args += [f"launch.procs_per_node={procs}", f"launch.master_port={self.port}"]
        proc = polytrain(*args, cwd=self.root)
        if not expect_ok:
            return proc
        assert proc.returncode == 0, proc.stderr[-4000:]
        (self.root / name / "stderr.log").write_text(proc.stderr)
        return self.root / name

    def resume_copy(self, source, name, step, *overrides, procs=1):
        """Copy ``source`` to ``name`` as it was at ``step`` and resume it there."""
        target = self.root / name
        shutil.copytree(source / "checkpoints" / f"step_{step:08d}", target / "checkpoints" / f"step_{step:08d}")
        shutil.copytree(source / "tokenizer", target / "tokenizer")
        return self.train(name, f"train.resume={target / 'checkpoints' / f'step_{step:08d}'}", *overrides,
                          procs=procs)


def losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row}


def metric(run_dir, key) -> dict[int, float]:
    return {row["step"]: row[key] for row in read_jsonl(run_dir / "metrics.jsonl") if key in row}


def samples(run_dir, rank=None) -> dict[int, dict[str, list[str]]]:
    """Sample ids per step (all micro-batches; all ranks unless ``rank``)."""
    out: dict[int, dict[str, list[str]]] = {}
    for path in sorted((run_dir / "samples").glob("rank*.jsonl")):
        if rank is not None and path.stem != f"rank{rank}":
            continue
        for row in read_jsonl(path):
            for task, ids in row["samples"].items():
                out.setdefault(row["step"], {}).setdefault(task, []).extend(ids)
    return out


def assert_close_curves(a: dict, b: dict, atol: float, steps=None):
    steps = steps or sorted(a)
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst <= atol, f"max |loss difference| {worst:.3g} > {atol} over steps {steps[0]}..{steps[-1]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    return Runs(tmp_path_factory.mktemp("engine"), data_cache)


@pytest.fixture(scope="module")
def stage_runs(runs):
    """The tiny recipe on 2 processes under each ZeRO stage, checkpoints at 10 and 20."""
    return {stage: runs.train(f"zero{stage}", f"engine.zero_stage={stage}", "train.save_every=10", procs=2)
            for stage in (0, 1, 2, 3)}


@pytest.fixture(scope="module")
def single_double(runs):
    """One process with every micro-batch doubled: the same global batch as the 2-process runs."""
    return runs.train("single", *DOUBLE, "train.save_every=10")


def test_zero_stages_give_the_same_loss_curve(stage_runs):
    reference = losses(stage_runs[0])
    assert len(reference) == STEPS and reference[STEPS] < reference[1]
    for stage in (1, 2, 3):
        assert_close_curves(losses(stage_runs[stage]), reference, atol=1e-5)


def test_two_process_zero2_replicas_agree_and_halve_the_optimizer_states(stage_runs):
    run = stage_runs[2]
    checkpoint = run / "checkpoints" / "step_00000020"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    digests = state["replica_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold identical parameters
    assert state["samples_seen"] == STEPS * 2 * (4 + 2)  # the global batch counts both ranks
    shards = checkpoint / "deepspeed" / "zero"
    sizes = [(shards / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").stat().st_size for r in (0, 1)]
    assert max(sizes) < 1.2 * min(sizes)  # each rank holds its half of the Adam states
    assert "(2 process(es), ZeRO stage 2)" in (run / "stderr.log").read_text()


def test_zero_stages_shard_optimizer_states(stage_runs):
    shards = {stage: sorted(p.name for p in (stage_runs[stage] / "checkpoints" / "step_00000020" / "deepspeed" /
                                               "zero").glob("*optim_states.pt")) for stage in (0, 1, 2, 3)}
    assert shards[0] == []  # stage 0 keeps the whole optimizer in the model states file
    for stage in (1, 2, 3):
        assert len(shards[stage]) == 2 and all(f"zero_pp_rank_{r}_" in shards[stage][r] for r in (0, 1))


def test_two_processes_equal_one_with_double_micro_batch(stage_runs, single_double):
    assert_close_curves(losses(stage_runs[2]), losses(single_double), atol=1e-5)
    two, one = samples(stage_runs[2]), samples(single_double)
    for step in range(1, STEPS + 1):
        for task in one[step]:
            assert sorted(two[step][task]) == sorted(one[step][task])


def test_bf16_tracks_fp32_within_two_percent(runs, single_double):
    bf16 = runs.train("bf16", "engine.precision=bf16", *DOUBLE)
    fp32, low = losses(single_double), losses(bf16)
    for step in fp32:
        assert low[step] == pytest.approx(fp32[step], rel=0.02), step
    assert losses(bf16) != fp32  # it really ran in bf16


def test_fp16_overflow_steps_are_skipped_and_counted(runs):
    run = runs.train("fp16", "engine.precision=fp16", "engine.initial_loss_scale_power=24",
                     "engine.loss_scale_window=2")
    skipped, lr = metric(run, "skipped_steps"), metric(run, "lr")
    assert skipped[1] == 1 and 0 < skipped[STEPS] < STEPS  # overflows at scale 2**24 until the scale settles
    overflowed = [s for s in range(1, STEPS) if skipped[s] > skipped.get(s - 1, 0)]
    for s in overflowed:  # a skipped step leaves the LR schedule where it was
        assert lr[s + 1] == lr[s], s
    assert losses(run)[STEPS] < losses(run)[1]


def test_exact_resume_is_bitwise_and_sees_every_sample_once(runs, single_double):
    resumed = runs.resume_copy(single_double, "resumed", 10, *DOUBLE)
    straight = losses(single_double)
    assert losses(resumed) == {s: straight[s] for s in range(11, STEPS + 1)}  # bitwise equal floats
    assert samples(resumed) == {s: v for s, v in samples(single_double).items() if s > 10}
    first_half = [i for s, v in samples(single_double).items() if s <= 10 for i in v["image_to_text"]]
    seen = first_half + [i for v in samples(resumed).values() for i in v["image_to_text"]]
    assert len(seen) == len(set(seen)) == STEPS * 8  # 160 of 1437 images: no repeats, none skipped


@pytest.mark.parametrize("source_stage, procs, overrides", [  # ZeRO-2 from 2 processes to 4, ZeRO-3 from 2 to 1
    (2, 4, ["data.tasks.image_to_text.batch_size=2", "data.tasks.text_lm.batch_size=1"]),
    (3, 1, ["train.grad_accum=2"]),
])
def test_resume_on_another_world_size_continues_the_curve(runs, stage_runs, source_stage, procs, overrides):
    source = stage_runs[source_stage]
    resumed = runs.resume_copy(source, f"from{source_stage}on{procs}", 10, f"engine.zero_stage={source_stage}",
                               *overrides, procs=procs)
    assert (resumed / "checkpoints" / "step_00000010" / "deepspeed_universal").is_dir()
    # Same global batch and data stream, restored optimizer state: the curve goes on as if never stopped.
    assert_close_curves(losses(resumed), losses(source), atol=1e-5, steps=list(range(11, STEPS + 1)))
    before = samples(source)
    for step, tasks in samples(resumed).items():  # the same samples, dealt to other ranks
        assert {t: sorted(ids) for t, ids in tasks.items()} == {t: sorted(ids) for t, ids in before[step].items()}
    assert sorted(samples(resumed)) == list(range(11, STEPS + 1))


def test_export_consolidates_zero3_shards(stage_runs, tmp_path):
    run = stage_runs[3]
    out = tmp_path / "model.safetensors"
    proc = polytrain("export", run, "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    exported = load_file(str(out))
    gathered = load_file(str(run / "checkpoints" / "step_00000020" / "model.safetensors"))
    assert exported.keys() == gathered.keys()
    for name in gathered:
        assert torch.equal(exported[name], gathered[name]), name
    assert (tmp_path / "model.yaml").is_file()
    cfg, tokenizers, model = load_exported(out)
    assert cfg.engine.zero_stage == 3 and tokenizers["text"].vocab_size == 512
    n_params = sum(t.numel() for t in exported.values())
    assert count_parameters(cfg) == (n_params, n_params)  # the planner's count, without building the model
    # One process, the exported file: the same held-out results the 2-process ZeRO-3 run computed at its end.
    results = evaluate(model, cfg.data.tasks, recipe.build_datasets(cfg, "val", tokenizers), tokenizers["text"],
                       torch.device("cpu"), cfg.train.eval_batch_size)
    final = json.loads((run / "eval.json").read_text())
    for task, metrics in final.items():
        for key, value in metrics.items():
            assert results[task][key] == pytest.approx(value, abs=1e-6), (task, key)


@pytest.fixture(scope="module")
def planned_source(runs):
    """A 10M-parameter model of the tiny recipe after one step: what the fine-tuning runs start from."""
    return runs.train("planned_source", *PLANNED_MODEL, "train.steps=1")


@pytest.fixture(scope="module")
def finetune_runs(runs, planned_source):
    """Fine-tuning under each ZeRO stage (2 processes): audio is new, the image task is gone, the backbone is
    frozen but for LoRA adapters, and the decoder unfreezes at step 3. Stage 2 runs in bf16."""
    recipe = runs.root / "finetune.yaml"
    recipe.write_text(FINETUNE_RECIPE)
    return {stage: runs.train(f"finetune{stage}", f"engine.zero_stage={stage}", f"finetune.init_from={planned_source}",
                              f"engine.precision={'bf16' if stage == 2 else 'fp32'}", procs=2, recipe=recipe)
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
    cfg = load_config(run / "config.yaml")
    n_params, n_trainable = count_parameters(cfg)
    assert n_trainable < n_params / 2  # the frozen backbone really is most of the model
    planned = estimate(cfg, Option(stage), 2, n_params, n_trainable, activations=0).states
    assert abs(measured / planned - 1) <= 0.15, f"measured {measured / GIB:.3f} GiB, planned {planned / GIB:.3f} GiB"


def test_export_folds_lora_into_the_weights(finetune_runs, tmp_path):
    run = finetune_runs[3]
    out = tmp_path / "merged.safetensors"
    proc = polytrain("export", run, "--out", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cfg, tokenizers, model = load_exported(out)
    assert cfg.finetune.lora.rank == 0 and not any(".lora_" in name for name in model.state_dict())
    trained = checkpoint_weights(run, 3)
    layer = "backbone.decoder.blocks.1.mlp.fc"
    want = trained[f"{layer}.weight"] + 4.0 * trained[f"{layer}.lora_b"] @ trained[f"{layer}.lora_a"]  # alpha 16 / 4
    assert torch.allclose(model.state_dict()[f"{layer}.weight"], want, atol=1e-6)
    results = evaluate(model, cfg.data.tasks, recipe.build_datasets(cfg, "val", tokenizers), tokenizers["text"],
                       torch.device("cpu"), cfg.train.eval_batch_size)
    for task, metrics in json.loads((run / "eval.json").read_text()).items():
        for key, value in metrics.items():
            assert results[task][key] == pytest.approx(value, abs=1e-4), (task, key)


def test_ranks_with_different_modalities_do_not_hang_under_zero3(runs):
    run = runs.train("mixed", "engine.zero_stage=3", "data.mixing=sampled", "data.tasks.image_to_text.batch_size=1",
                     "data.tasks.text_lm.batch_size=1", "train.steps=16", procs=2)
    rank0, rank1 = samples(run, 0), samples(run, 1)
    uneven = [s for s in rank0 if set(rank0[s]) == {"text_lm"} and set(rank1[s]) == {"text_lm", "image_to_text"}]
    assert uneven, "the seed should give a step where rank 0 is text-only and rank 1 has image+text"
    assert losses(run)[16] < losses(run)[1]


@pytest.mark.parametrize("stage, offload", [(2, ["engine.offload_optimizer=true"]),
                                            (3, ["engine.offload_optimizer=true", "engine.offload_params=true"])])
def test_offload_follows_the_same_curve(runs, stage_runs, stage, offload):
    run = runs.train(f"offload{stage}", f"engine.zero_stage={stage}", *offload, procs=2)
    assert_close_curves(losses(run), losses(stage_runs[stage]), atol=1e-5)  # CPU Adam in AdamW mode


def test_global_batch_that_does_not_add_up_names_every_factor(runs):
    proc = runs.train("badbatch", "train.global_batch=7", "train.grad_accum=2", expect_ok=False)
    assert proc.returncode == 2
    assert ("train.global_batch=7: != micro-batch 6 (image_to_text 4 + text_lm 2) x train.grad_accum 2 x "
            "data-parallel processes 1 = 12") in proc.stderr


def test_kill_during_save_leaves_latest_at_the_previous_checkpoint(runs):
    run = runs.root / "killed"
    args = [sys.executable, "-m", "polytrain.cli", "train", TINY, f"train.out_dir={runs.root}", "train.run_name=killed",
            f"data.cache_dir={runs.cache}", "train.save_every=1", "train.steps=200", "model.backbone.dim=256",
            "model.backbone.n_heads=4", "model.backbone.encoder_layers=2", "model.backbone.decoder_layers=2"]
    proc = subprocess.Popen(args, cwd=runs.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    checkpoints, deadline = run / "checkpoints", time.time() + 300
    try:
        while time.time() < deadline:  # wait until a save is under way after one has completed
            if (checkpoints / "latest").is_file() and list(checkpoints.glob(".tmp-step_*/deepspeed")):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = sorted(checkpoints.glob(".tmp-step_*"))
    assert partial, "the run was not caught in the middle of a save"
    latest = (checkpoints / "latest").read_text().strip()
    complete = int(latest.split("_")[1])
    assert int(partial[-1].name.split("_")[1]) > complete and (checkpoints / latest / "model.safetensors").is_file()
    runs.train("killed", f"train.resume={run}", f"train.steps={complete + 2}", "train.save_every=1",
               "model.backbone.dim=256", "model.backbone.n_heads=4", "model.backbone.encoder_layers=2",
               "model.backbone.decoder_layers=2")
    state = json.loads((checkpoints / f"step_{complete + 2:08d}" / "trainer_state.json").read_text())
    assert state["step"] == complete + 2 and not list(checkpoints.glob(".tmp-step_*"))[1:]
    # the killed attempt's rows after the checkpoint are dropped on resume; the rows past it are the resumed run's
    after = [row["step"] for row in read_jsonl(run / "metrics.jsonl") if "loss" in row and row["step"] > complete]
    assert after == [complete + 1, complete + 2]  # continued right after the last complete checkpoint
