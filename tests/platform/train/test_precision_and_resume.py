"""One-process runs of the tiny recipe: precision, exact resume, a save killed halfway, the global batch check."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from polytrain.errors import ConfigError
from polytrain.job import resolve
from polytrain.platform.train.preflight import cpu_has_fp16, cpu_name
from tests.helpers import read_jsonl
from tests.platform.runs import DOUBLE, STEPS, TINY, losses, metric, samples

pytestmark = pytest.mark.slow


def test_bf16_tracks_fp32_within_two_percent(runs, single_double):
    bf16 = runs.train("bf16", "engine.precision=bf16", *DOUBLE)
    fp32, low = losses(single_double), losses(bf16)
    for step in fp32:
        assert low[step] == pytest.approx(fp32[step], rel=0.02), step
    assert losses(bf16) != fp32  # it really ran in bf16


@pytest.mark.skipif(not cpu_has_fp16() and not torch.cuda.is_available(),
                    reason=f"this CPU ({cpu_name()}) cannot train in fp16: oneDNN reports no fp16 support "
                           "(test_step.py covers the overflow logic without fp16 hardware)")
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


def test_global_batch_that_does_not_add_up_names_every_factor(runs):
    proc = runs.train("badbatch", "train.global_batch=7", expect_ok=False)
    assert proc.returncode == 2
    assert ("train.global_batch=7: is not micro-batch 6 (image_to_text 4 + text_lm 2) x 1 data-parallel process(es) "
            "x a whole number of accumulation steps (per step: 6)") in proc.stderr


@pytest.mark.parametrize("processes, overrides, accum", [
    (1, ["train.global_batch=24"], 4), (2, ["train.global_batch=24"], 2), (4, ["train.global_batch=24"], 1),
    (2, [], 1), (2, ["train.grad_accum=3"], 3), (2, ["train.global_batch=24", "train.grad_accum=2"], 2),
])
def test_the_global_batch_a_recipe_states_splits_into_accumulation_on_the_jobs_processes(processes, overrides,
                                                                                           accum):
    job = resolve(TINY, overrides, processes)
    assert job.cfg.train.grad_accum == accum and job.batch.global_batch == 6 * accum * processes


def test_a_grad_accum_that_contradicts_the_global_batch_names_both():
    with pytest.raises(ConfigError, match=r"train.global_batch=24: implies a different number of accumulation steps "
                       r"per process than the other figures of the step \(train.global_batch=24 gives 2, "
                       r"train.grad_accum=3 gives 3\) on 2 data-parallel process"):
        resolve(TINY, ["train.global_batch=24", "train.grad_accum=3"], 2)


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
