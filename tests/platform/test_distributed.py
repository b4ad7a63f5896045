"""Two real processes on gloo under DeepSpeed ZeRO-2, started by ``polytrain launch`` (torchrun)."""

import json

import pytest

from tests.helpers import QUICKSTART, polytrain

pytestmark = pytest.mark.slow


def test_two_process_zero2_replicas_agree(tmp_path, data_cache, free_port):
    proc = polytrain("launch", QUICKSTART, "launch.procs_per_node=2", f"launch.master_port={free_port}",
                     "engine.zero_stage=2", "train.steps=6", "train.warmup_steps=2", "tracking.log_every=2",
                     "data.tasks.text_lm.max_val_samples=8", f"data.cache_dir={data_cache}",
                     f"train.out_dir={tmp_path}", "train.run_name=ddp", "tracking.progress_bar=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    checkpoint = tmp_path / "ddp" / "checkpoints" / "step_00000006"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    digests = state["replica_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # both ranks hold identical parameters
    assert state["samples_seen"] == 6 * 2 * (32 + 16 + 8)  # global batch counts both ranks
    shards = checkpoint / "deepspeed" / "zero"
    optimizer = sorted(p.name for p in shards.glob("zero_pp_rank_*_optim_states.pt"))
    assert optimizer == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    sizes = [(shards / name).stat().st_size for name in optimizer]
    assert max(sizes) < 1.2 * min(sizes)  # each rank holds its half of the Adam states
    assert "(2 process(es), ZeRO stage 2)" in proc.stderr
