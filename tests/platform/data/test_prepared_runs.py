"""Prepared data end to end, through the CLI: prepare the tiny recipe, train on 2 processes with the image task
filled to a cost budget, resume on 4, then on 1: every step holds the same samples and the curve goes on."""

import json

import pytest

from tests.helpers import polytrain
from tests.platform.runs import TINY, Runs, assert_close_curves, losses, samples

pytestmark = pytest.mark.slow

STEPS = 8
TASKS = ("image_to_text", "text_lm")
WORLDS = {  # processes -> overrides that keep the global step the same (80 tokens of images, 4 LM windows)
    2: ["data.tasks.image_to_text.budget=40", "data.tasks.text_lm.batch_size=2"],
    4: ["data.tasks.image_to_text.budget=20", "data.tasks.text_lm.batch_size=1"],
    1: ["data.tasks.image_to_text.budget=40", "data.tasks.text_lm.batch_size=2", "train.grad_accum=2"],
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("prepared")
    proc = polytrain("data", "prepare", TINY, "--out", root / "data", f"data.cache_dir={data_cache}", "--workers", "2",
                     cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    words = proc.stdout.strip().splitlines()[-1].split()  # "train on it with: polytrain train CONFIG ..."
    overrides = [w for w in words if w.startswith("data.tasks.")]
    assert [o.split("=")[0] for o in overrides] == [f"data.tasks.{t}.{s}" for t in TASKS for s in ("train", "val")]
    again = polytrain("data", "prepare", TINY, "--out", root / "data", f"data.cache_dir={data_cache}", cwd=root)
    assert again.returncode == 0 and again.stderr.count("already prepared") == 4
    return root, overrides


def test_prepare_train_and_resume_on_other_world_sizes(prepared, data_cache):
    root, overrides = prepared
    runs = Runs(root, data_cache)
    common = [*overrides, "engine.zero_stage=0", f"train.steps={STEPS}", "train.save_every=3"]
    two = runs.train("two", *common, *WORLDS[2], procs=2)
    four = runs.resume_copy(two, "four", 3, *common, *WORLDS[4], procs=4)
    one = runs.resume_copy(four, "one", 6, *common, *WORLDS[1])
    reference = samples(two)
    taken = [i for step in range(1, STEPS + 1) for i in reference[step]["image_to_text"]]
    assert len(taken) == len(set(taken))  # within one epoch: no image twice
    for run, first in ((four, 4), (one, 7)):
        assert_close_curves(losses(run), losses(two), atol=1e-5, steps=list(range(first, STEPS + 1)))
        for step, tasks in samples(run).items():  # the same samples in every step, dealt to other ranks
            assert {t: sorted(ids) for t, ids in tasks.items()} == {t: sorted(ids) for t, ids in reference[step].items()}
    metrics = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert all(row["rank_load"] <= 1.10 for row in metrics if "rank_load" in row)
