"""Launch settings that cannot work stop before anything starts, naming the key, the value and what is allowed."""

import pytest

from tests.helpers import QUICKSTART

STATIC_PAIR = ("launch.nodes=2", "launch.rdzv.backend=static", "launch.master_addr=10.0.0.1")


@pytest.mark.parametrize("overrides, fragments", [
    (["launch.backend=mpirun"], ["launch.backend='mpirun': unknown launcher; known: deepspeed, slurm, torchrun"]),
    (["launch.nodes=0"], ["launch.nodes=0: must be >= 1"]),
    (["launch.procs_per_node=0"], ["launch.procs_per_node=0: must be >= 1"]),
    (["launch.master_port=70000"], ["launch.master_port=70000: must be a TCP port in 1..65535"]),
    (["launch.nodes=2"], ["launch.master_addr=None: is required for nodes=2 with torchrun"]),
    (["launch.master_addr=root@node-0"], ["launch.master_addr='root@node-0': must be a host name"]),
    ([*STATIC_PAIR, "launch.node_rank=2"], ["launch.node_rank=2: must be in [0, nodes=2)"]),
    (["launch.nodes=2", "launch.master_addr=10.0.0.1", "launch.node_rank=1"],
     ["launch.node_rank=1: is only used by torchrun's static rendezvous", "rdzv.backend=c10d"]),
    (["launch.backend=deepspeed", "launch.nodes=2"],
     ["launch.hostfile=None: is required for nodes=2 with backend=deepspeed", "over ssh"]),
    (["launch.backend=deepspeed", "launch.nodes=2", "launch.hostfile=h", "launch.node_rank=1"],
     ["launch.node_rank=1: is only used by torchrun's static rendezvous"]),
    (["launch.backend=slurm", "launch.nodes=2", "launch.rdzv.backend=static", "launch.node_rank=1"],
     ["launch.node_rank=1: is only used by torchrun's static rendezvous", "backend=slurm"]),
    (["launch.backend=slurm", "launch.hostfile=hosts"], ["launch.hostfile='hosts': cannot be used with backend=slurm"]),
    (["launch.backend=slurm", "launch.master_addr=10.0.0.1"],
     ["launch.master_addr='10.0.0.1': cannot be used with backend=slurm", "first node"]),
    (["launch.rdzv.backend=etcd"], ["launch.rdzv.backend='etcd': must be one of 'c10d', 'static'"]),
    (["launch.rdzv.timeout=0"], ["launch.rdzv.timeout=0: must be in 1..10000000 seconds"]),
    (["launch.rdzv.id=two words"], ["launch.rdzv.id='two words': must be a non-empty word without spaces"]),
    (["launch.slurm.time=1h"], ["launch.slurm.time='1h': must be a SLURM time limit"]),
    (["launch.slurm.time=2:00:00"], ["launch.slurm.time=7200: YAML read an unquoted time", "leading zero (02:00:00"]),
    (["launch.slurm.gpus_per_node=-1"], ["launch.slurm.gpus_per_node=-1: must be >= 0"]),
    (["launch.slurm.sbatch_args=[qos=high]"], ["launch.slurm.sbatch_args.0='qos=high': must be one sbatch option"]),
])
def test_impossible_launch_settings_exit_2_naming_the_key(cli, overrides, fragments):
    result = cli("launch", QUICKSTART, *overrides, "--dry-run")
    assert result.code == 2 and result.out == ""
    for fragment in fragments:
        assert fragment in result.error


@pytest.mark.parametrize("given, time", [("'30'", "30"), ("00:30", "00:30"), ("02:00:00", "02:00:00"),
                                         ("1-0", "1-0"), ("1-12:00", "1-12:00"), ("7-00:00:00", "7-00:00:00")])
def test_every_slurm_time_format_is_accepted(cli, given, time):
    result = cli("launch", QUICKSTART, "launch.backend=slurm", f"launch.slurm.time={given}", "--dry-run")
    assert result.code == 0 and f"#SBATCH --time={time}\n" in result.out


def test_hostfile_must_hold_the_nodes_and_processes(cli, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("worker-0 slots=8\nworker-1 slots=4\n")
    too_many_nodes = cli("launch", QUICKSTART, "launch.nodes=3", f"launch.hostfile={hosts}", "--dry-run")
    assert too_many_nodes.code == 2
    assert too_many_nodes.error == f"launch.nodes=3: the hostfile {hosts} lists only 2 host(s)"
    too_few_slots = cli("launch", QUICKSTART, "launch.nodes=2", "launch.procs_per_node=8", f"launch.hostfile={hosts}",
                        "--dry-run")
    assert too_few_slots.code == 2
    assert too_few_slots.error == f"{hosts}:2: worker-1 has slots=4, fewer than launch.procs_per_node=8"
    hosts.write_text("worker-0 slots=8\nworker-0 slots=8\n")
    duplicate = cli("launch", QUICKSTART, f"launch.hostfile={hosts}", "--dry-run")
    assert duplicate.code == 2 and duplicate.error == f"{hosts}:2: host 'worker-0' is already listed on line 1"


def test_submit_is_for_slurm_only(cli):
    result = cli("launch", QUICKSTART, "--submit")
    assert result.code == 2
    assert result.error == "--submit=True: submits SLURM jobs; launch.backend='torchrun' (set launch.backend=slurm)"
    both = cli("launch", QUICKSTART, "launch.backend=slurm", "--submit", "--dry-run")
    assert both.code == 2 and "cannot be combined with --dry-run" in both.error


def test_dry_run_may_stand_anywhere_among_the_overrides(cli):
    after = cli("launch", QUICKSTART, "launch.procs_per_node=2", "--dry-run")
    between = cli("launch", QUICKSTART, "--dry-run", "launch.procs_per_node=2")
    assert after.code == between.code == 0 and after.out == between.out and "--nproc-per-node=2" in after.out
