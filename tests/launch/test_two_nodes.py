"""Two "nodes" on one machine: the per-node command of a generated SLURM script, run twice.

Each run is what srun starts on one node: ``polytrain launch`` with torchrun and a static
rendezvous on $MASTER_ADDR, node rank from $SLURM_NODEID (0 and 1), 2 gloo processes each.
The four ranks train the quick start under ZeRO-2 and must end with identical parameters.
"""

import json
import os
import subprocess

import pytest

from tests.helpers import QUICKSTART
from tests.launch.sbatch import node_command

pytestmark = pytest.mark.slow

STEPS = 2
BATCH = {"image_to_text": 4, "audio_to_text": 2, "text_lm": 1}
"""Per-process micro-batch of each quick-start task."""


def test_two_nodes_train_to_identical_parameters(cli, tmp_path, monkeypatch, data_cache, free_port):
    monkeypatch.chdir(tmp_path)
    script = cli("launch", QUICKSTART, "launch.backend=slurm", "launch.nodes=2", "launch.procs_per_node=2",
                 "launch.rdzv.backend=static", f"launch.master_port={free_port}", "launch.rdzv.timeout=120",
                 "engine.zero_stage=2", f"train.steps={STEPS}", "train.warmup_steps=1",
                 *(f"data.tasks.{task}.batch_size={size}" for task, size in BATCH.items()),
                 *(f"data.tasks.{task}.max_val_samples=4" for task in BATCH), f"data.cache_dir={data_cache}",
                 f"train.out_dir={tmp_path}", "train.run_name=two_nodes", "tracking.progress_bar=false",
                 "--dry-run").out
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "SLURM_JOB_ID": "4242", "PYTHONUNBUFFERED": "1"}
    nodes = [subprocess.Popen(["bash", "-c", node_command(script)], env={**env, "SLURM_NODEID": str(node)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (1, 0)]
    logs = {node: proc.communicate(timeout=400)[1] for node, proc in zip((1, 0), nodes)}
    for node, proc in zip((1, 0), nodes):
        assert proc.returncode == 0, logs[node][-4000:]
        assert f"--nnodes=2 --nproc-per-node=2 --node-rank={node} --master-addr=127.0.0.1" in logs[node]
    checkpoint = tmp_path / "two_nodes" / "checkpoints" / f"step_{STEPS:08d}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    digests = state["replica_sha256"]
    assert len(digests) == 4 and len(set(digests)) == 1  # all four ranks hold identical parameters
    assert state["samples_seen"] == STEPS * 4 * sum(BATCH.values())  # every rank of both nodes trained
    shards = sorted((checkpoint / "deepspeed" / "zero").glob("zero_pp_rank_*_optim_states.pt"))
    assert [p.name for p in shards] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)]
    sizes = [p.stat().st_size for p in shards]
    assert max(sizes) < 1.2 * min(sizes)  # ZeRO-2: each rank holds a quarter of the Adam states
    assert "(4 process(es), ZeRO stage 2)" in logs[0]  # rank 0 is on node 0
