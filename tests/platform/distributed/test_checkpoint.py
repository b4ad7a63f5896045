"""A checkpoint that cannot be written (here: a file-size limit, as a full disk or a quota would refuse it) leaves
``latest`` on the previous one, leaves no debris, and says in one line how much room a checkpoint needs."""

import re
import resource
import subprocess
import sys

import pytest

from tests.platform.runs import TINY, losses
from tests.test_cli import assert_clean_error

pytestmark = pytest.mark.slow

LIMIT = 100_000
"""Bytes a file may have: more than the logs, the tokenizer and the RNG states; less than the model's shards."""


def test_a_checkpoint_that_does_not_fit_leaves_latest_on_the_previous_one(runs):
    run = runs.train("full", "train.steps=3")
    complete = run / "checkpoints" / "step_00000003"
    size = sum(path.stat().st_size for path in complete.rglob("*") if path.is_file())
    args = ["train", TINY, f"train.out_dir={runs.root}", "train.run_name=full", f"data.cache_dir={runs.cache}",
            f"train.resume={run}", "train.steps=6", "train.save_every=2", "train.failed_save=continue"]
    proc = subprocess.run([sys.executable, "-m", "polytrain.cli", *map(str, args)], cwd=runs.root, capture_output=True,
                          text=True, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT)))
    # step 4's save fails and training goes on (train.failed_save=continue); the last step's must be written
    warning = re.search(r"step 4: checkpoint step_00000004 could not be written: .*; training goes on", proc.stderr)
    assert warning, proc.stderr[-3000:]
    assert_clean_error(proc, "checkpoint step_00000006 could not be written: ", "/deepspeed/zero/",
                       "this process may write files of at most 100 kB (ulimit -f)",
                       "checkpoints/latest still names step_00000003")
    needed = re.search(r"a checkpoint of this run needs at least ([\d.]+) kB", proc.stderr.splitlines()[-1])
    assert needed and 0.85 * size <= float(needed[1]) * 1000 <= size  # the complete checkpoint's size, headers aside
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000003"]  # nothing half-made
    assert (run / "checkpoints" / "latest").read_text() == "step_00000003\n"
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]  # trained on past the failed save
