"""DeepSpeed ZeRO 0-3 for real: the tiny recipe on 2 gloo processes under each stage gives the same loss
curve, shards what each stage shards, resumes on 1 and 4 processes, exports whole weights, and offloads; and
the 2-process job survives a stop signal and a killed rank with the same curve."""

import json
import os
import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from polytrain.job import Job
from polytrain.platform.data.builtin import task_manifests
from polytrain.platform.data.datasets import build_datasets
from polytrain.platform.train.evaluate import evaluate
from tests.helpers import polytrain, read_jsonl, trained_run
from tests.platform.runs import (
    STEPS,
    assert_close_curves,
    finish,
    losses,
    rank_pid,
    samples,
    start,
    trained_steps,
    wait_for,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stage_runs(runs):
    """The tiny recipe on 2 processes under each ZeRO stage, checkpoints at 10 and 20."""
    return {stage: runs.train(f"zero{stage}", f"engine.zero_stage={stage}", "train.save_every=10", procs=2)
            for stage in (0, 1, 2, 3)}


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


@pytest.mark.parametrize("source_stage, procs, overrides, accum", [  # ZeRO-2 from 2 processes to 4, ZeRO-3 to 1
    (2, 4, ["data.tasks.image_to_text.batch_size=2", "data.tasks.text_lm.batch_size=1"], None),
    (3, 1, [], "grad_accum 1 -> 2 keeps its global batch of 12"),  # the checkpoint's global batch, by itself
])
def test_resume_on_another_world_size_continues_the_curve(runs, stage_runs, source_stage, procs, overrides, accum):
    source = stage_runs[source_stage]
    resumed = runs.resume_copy(source, f"from{source_stage}on{procs}", 10, f"engine.zero_stage={source_stage}",
                               *overrides, procs=procs)
    assert accum is None or accum in (resumed / "stderr.log").read_text()
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
    cfg, tokenizers, model = trained_run(out)
    assert cfg.engine.zero_stage == 3 and tokenizers["text"].vocab_size == 512
    n_params = sum(t.numel() for t in exported.values())
    assert Job.of_run(out).parameter_counts() == (n_params, n_params)  # the planner's count, on the meta device
    # One process, the exported file: the same held-out results the 2-process ZeRO-3 run computed at its end.
    results = evaluate(model, cfg.data.tasks, build_datasets(cfg, "val", tokenizers, task_manifests(cfg)), tokenizers["text"],
                       torch.device("cpu"), cfg.train.eval_batch_size)
    final = json.loads((run / "eval.json").read_text())
    for task, metrics in final.items():
        for key, value in metrics.items():
            assert results[task][key] == pytest.approx(value, abs=1e-6), (task, key)


@pytest.mark.parametrize("stage, offload", [(2, ["engine.offload_optimizer=true"]),
                                            (3, ["engine.offload_optimizer=true", "engine.offload_params=true"])])
def test_offload_follows_the_same_curve(runs, stage_runs, stage, offload):
    run = runs.train(f"offload{stage}", f"engine.zero_stage={stage}", *offload, procs=2)
    assert_close_curves(losses(run), losses(stage_runs[stage]), atol=1e-5)  # CPU Adam in AdamW mode


def test_a_stopped_job_resumes_and_a_killed_rank_restarts_on_the_uninterrupted_curve(runs, stage_runs):
    """A stop signal that reaches one rank stops both at one step, with a checkpoint, exit code 75 and no restart;
    the resumed job then loses rank 1 to SIGKILL after its checkpoint at step 10, torchrun restarts it
    (launch.max_restarts), the restart resumes by itself and the job completes. The curve, every step, is
    the uninterrupted 2-process run's, bitwise."""
    straight, run = stage_runs[2], runs.root / "interrupted"
    job = start(runs, "interrupted", "launch.max_restarts=1")  # a stop is no failure to restart from
    wait_for(lambda: trained_steps(run) >= 4, job)
    os.kill(rank_pid(job, 1), signal.SIGUSR1)  # as a scheduler whose signal reaches the ranks at different times
    code, stderr = finish(job)
    assert code == 75, stderr[-3000:]
    stops = re.findall(r"^polytrain: stopped by SIG\w+ after step (\d+): checkpoint (\S+);", stderr, re.M)
    assert len(stops) == 3, stderr[-3000:]  # each rank's line, then the launcher's: one step, one checkpoint
    step = int(stops[0][0])
    assert set(stops) == {(str(step), str(run / "checkpoints" / f"step_{step:08d}"))} and 4 <= step < 10
    assert "this job was restarted" not in stderr and trained_steps(run) == step
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}\n"

    job = start(runs, "interrupted", f"train.resume={run}", "train.save_every=10", "launch.max_restarts=1")
    wait_for(lambda: (run / "checkpoints" / "latest").read_text() == "step_00000010\n", job)
    logged = trained_steps(run)
    os.kill(rank_pid(job, 1), signal.SIGKILL)
    steps = [row["step"] for row in read_jsonl(run / "samples" / "rank1.jsonl")]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] >= logged  # every step, up to the kill
    code, stderr = finish(job)
    assert code == 0, stderr[-3000:]
    assert "this job was restarted (TORCHELASTIC_RESTART_COUNT=1): it resumes from" in stderr
    assert json.loads((run / "eval.json").read_text()).keys() == {"image_to_text", "text_lm"}
    assert losses(run) == losses(straight)  # bitwise, before the stop, after the resume and after the restart
    assert samples(run) == samples(straight)  # each sample once, at the same step on the same rank
