import sys

import pytest

from polytrain.errors import ConfigError
from polytrain.launch.local import LaunchConfig, torchrun_command


def test_torchrun_command_for_one_node():
    cfg = LaunchConfig(procs_per_node=4, master_port=12345)
    assert torchrun_command(cfg, "c.yaml", ["train.steps=3"]) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=4", "--node_rank=0",
        "--master_addr=127.0.0.1", "--master_port=12345", "-m", "polytrain.cli", "train", "c.yaml", "train.steps=3"]


@pytest.mark.parametrize("kwargs, key", [
    ({"nodes": 0}, "nodes"), ({"procs_per_node": 0}, "procs_per_node"),
    ({"nodes": 2, "node_rank": 2}, "node_rank"), ({"master_port": 70000}, "master_port"),
])
def test_bad_launch_settings(kwargs, key):
    with pytest.raises(ConfigError) as err:
        LaunchConfig(**kwargs).check()
    assert err.value.key == key
