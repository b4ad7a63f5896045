"""Sequence parallelism through the CLI: ``polytrain launch ... launch.procs_per_node=2 engine.sequence_parallel=2``
trains the tiny recipe (an encoder-decoder task and a decoder LM; ZeRO-3, activation checkpointing) on the loss
curve of one process with the same global batch, both ranks reading the same samples; resumed on 4 processes
(DeepSpeed's universal checkpoint) as 2 data-parallel groups of 2, or as one group of 4, it goes on along the same
curve. A dry run shows the layout; a size that does not fit the job or the model is refused in one line before
any process group starts."""

import pytest

from polytrain.config import load_config
from polytrain.errors import ConfigError
from tests.helpers import polytrain
from tests.platform.runs import TINY, Runs, assert_close_curves, losses, samples

SP = ("model.backbone.dim=256", "model.backbone.n_heads=4", "model.backbone.checkpointing=true", "engine.zero_stage=3")
"""Every run here: 4 heads (sequence_parallel up to 4 divides them), activations recomputed in the backward pass,
ZeRO-3 at a width where DeepSpeed really partitions the attention and MLP weights (over 1e5 elements each)."""


@pytest.fixture(scope="module")
def sp_runs(tmp_path_factory, data_cache):
    runs = Runs(tmp_path_factory.mktemp("sp-runs"), data_cache)
    return runs, runs.train("one", *SP), runs.train("sp2", *SP, "engine.sequence_parallel=2", "train.save_every=10",
                                                    procs=2)


@pytest.mark.slow
def test_two_processes_sharing_each_sample_follow_one_process(sp_runs):
    _, one, sp2 = sp_runs
    assert_close_curves(losses(sp2), losses(one), atol=1e-5)
    reference, rank0, rank1 = samples(one), samples(sp2, 0), samples(sp2, 1)
    assert rank0 == rank1 == reference  # the group reads the whole global batch, each rank all of it
    log = (sp2 / "stderr.log").read_text()
    assert "layout: 2 process(es) = 1 data-parallel x 2 sequence-parallel; ranks sharing each sample: [0, 1]" in log


@pytest.mark.slow
@pytest.mark.parametrize("data_parallel, overrides", [
    (2, ["engine.sequence_parallel=2", "data.tasks.image_to_text.batch_size=2", "data.tasks.text_lm.batch_size=1"]),
    (1, ["engine.sequence_parallel=4"]),
], ids=["2x2", "1x4"])
def test_resumed_on_4_processes_in_another_layout_the_curve_goes_on(sp_runs, data_parallel, overrides):
    runs, one, sp2 = sp_runs
    resumed = runs.resume_copy(sp2, f"sp{data_parallel}x{4 // data_parallel}", 10, *SP, *overrides, procs=4)
    assert_close_curves(losses(resumed), losses(one), atol=1e-5, steps=list(range(11, 21)))
    groups = [samples(resumed, rank) for rank in range(4)]
    firsts = groups[::4 // data_parallel]  # the first rank of each group
    assert all(groups[r] == firsts[r * data_parallel // 4] for r in range(4))  # a group's ranks read alike
    for step, tasks in samples(one).items():
        if step > 10:  # the groups hold the step's samples between them
            assert {t: sorted(i for g in firsts for i in g[step].get(t, [])) for t in tasks} == \
                   {t: sorted(ids) for t, ids in tasks.items()}
    layout = f"{data_parallel} data-parallel x {4 // data_parallel} sequence-parallel"
    assert layout in (resumed / "stderr.log").read_text()


def test_a_dry_run_shows_the_layout_and_the_nodes_commands_stay_as_they_are(tmp_path):
    proc = polytrain("launch", TINY, f"train.out_dir={tmp_path}", "launch.procs_per_node=4",
                     "engine.sequence_parallel=2", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "polytrain launch: layout: 4 process(es) = 2 data-parallel x 2 sequence-parallel; ranks sharing each " \
           "sample: [0, 1] [2, 3]" in proc.stderr
    assert "layout" not in proc.stdout and "--nproc-per-node=4" in proc.stdout
    assert "engine.sequence_parallel=2" in proc.stdout  # the nodes run the job the dry run described

def test_a_size_that_does_not_divide_the_job_is_refused_before_it_starts(tmp_path, monkeypatch):
    proc = polytrain("launch", TINY, f"train.out_dir={tmp_path}", "launch.procs_per_node=3",
                     "engine.sequence_parallel=2", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "polytrain: error: engine.sequence_parallel=2: must divide the job's 3 process(es) (launch.nodes 1 x "
        "launch.procs_per_node 3); use one of 1, 3, or a job of a multiple of 2 processes")
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
    for name, value in (("WORLD_SIZE", "3"), ("RANK", "0"), ("LOCAL_RANK", "0")):  # as torchrun starts a process
        monkeypatch.setenv(name, value)
    proc = polytrain("train", TINY, f"train.out_dir={tmp_path}", "engine.sequence_parallel=2", cwd=tmp_path)
    assert proc.returncode == 2 and "engine.sequence_parallel=2: must divide the job's 3 process(es) (WORLD_SIZE=3)" \
        in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("overrides, message", [
    (["engine.sequence_parallel=4"], "must divide the query heads of model.backbone, 2"),
    (["model.backbone.n_heads=4", "model.backbone.n_kv_heads=2", "engine.sequence_parallel=4"],
     "must divide the key/value heads (n_kv_heads, or n_heads when 0) of model.backbone, 2"),
    (["model.backbone.n_heads=4", "model.backbone.encoder={n_heads: 2}", "engine.sequence_parallel=4"],
     "must divide the query heads of model.backbone.encoder, 2"),
    (["model.backbone.drop_path=0.1", "engine.sequence_parallel=2"],
     "cannot be combined with model.backbone.drop_path"),
])
def test_a_size_the_model_cannot_split_is_refused_when_the_config_is_read(overrides, message):
    with pytest.raises(ConfigError, match="engine.sequence_parallel") as err:
        load_config(TINY, overrides)
    assert message in str(err.value)
