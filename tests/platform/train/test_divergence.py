"""Divergence is caught: a step whose loss or gradient norm is not finite is skipped and logged with its samples,
too many in a row stop the run in one line naming the steps and the last sound checkpoint, and no checkpoint or
"success" is ever made of non-finite values."""

import re

import pytest

from tests.helpers import read_jsonl
from tests.platform.runs import metric, samples
from tests.test_cli import assert_clean_error

pytestmark = pytest.mark.slow

DIVERGE = ("train.lr=1e30", "train.weight_decay=0", "train.max_bad_steps=3", "train.save_every=1")
"""Step 1 moves every weight by about 1e30: from step 2 on every loss is NaN."""


@pytest.mark.parametrize("stage", [0, 2])  # 0: DeepSpeed steps torch's AdamW as is (guard_step); 2: its ZeRO optimizer
def test_a_diverging_run_skips_logs_and_stops_without_saving_what_diverged(runs, stage):
    name = f"diverge{stage}"
    proc = runs.train(name, *DIVERGE, f"engine.zero_stage={stage}", expect_ok=False)
    run = runs.root / name
    assert_clean_error(proc, "training diverged: 3 steps in a row (2-4, train.max_bad_steps=3) had a non-finite loss "
                       "(image_to_text, text_lm)", f"the last checkpoint (finite weights) is {run}/checkpoints/"
                       "step_00000001")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]
    assert not (run / "eval.json").exists()
    assert metric(run, "skipped_steps") == {1: 0, 2: 1, 3: 2, 4: 3}  # each bad step skipped, none applied
    assert metric(run, "grad_norm")[1] > 0  # stage 0 reports the norm guard_step took
    # each bad step's log line names the samples of its micro-batch, as the sample log has them
    for step in (2, 3, 4):
        logged = re.search(rf"step {step}: the loss of micro-batch 0 on rank 0 is not finite \(image_to_text=nan, "
                           rf"text_lm=nan\); samples (\{{.*\}}); the step is skipped", proc.stderr)
        assert logged and eval(logged[1]) == samples(run)[step]


def test_an_evaluation_that_is_not_finite_fails_the_run(runs):
    # weights drawn at a std of 1e30: every loss is NaN from the start, but too few steps to stop on them
    proc = runs.train("naneval", "model.init_std=1e30", "train.steps=2", "train.max_bad_steps=5", expect_ok=False)
    assert_clean_error(proc, "the evaluation at step 2 is not finite: image_to_text.val_loss=nan, text_lm.val_loss=nan",
                       "no checkpoint was written")
    run = runs.root / "naneval"
    assert not (run / "eval.json").exists() and not (run / "checkpoints").exists()
    assert [row["step"] for row in read_jsonl(run / "metrics.jsonl") if "eval/text_lm/val_loss" in row] == []
