"""The torchrun backend: dry-run commands read back by torchrun's own parser; failing jobs on 127.0.0.1.

Nodes that never arrive end with the rendezvous named; a rank that dies stops the job with its
error. (Two nodes that do arrive: test_two_nodes.py.)
"""

import re
import shlex
import socket
import subprocess
import sys
import time

import pytest
from torch.distributed.run import config_from_args, parse_args

from polytrain.platform.data.order import DataOrder, StreamState
from tests.helpers import QUICKSTART, polytrain
from tests.test_cli import assert_clean_error, tiny_recipe, write_images

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def read_back(command: str, monkeypatch):
    """What torchrun makes of a printed command: its launch config and each process's command line."""
    argv = shlex.split(command)
    assert argv[:3] == TORCHRUN
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun would set it in this process for later tests
    config, program, args = config_from_args(parse_args(argv[3:]))
    return config, [program, *args]


def test_one_node_takes_a_free_port(cli):
    result = cli("launch", QUICKSTART, "launch.procs_per_node=3", "launch.master_port=29400", "--dry-run")
    assert result.code == 0, result.err
    comment, command = result.out.splitlines()
    args = parse_args(shlex.split(command)[3:])
    # --standalone: torchrun hosts the rendezvous itself on a free port, whatever holds 29400
    assert (comment, args.standalone, args.nnodes, args.nproc_per_node) == ("# on this node: 3 process(es)", True,
                                                                            "1", "3")


def test_static_dry_run_gives_each_node_its_rank(cli, monkeypatch):
    result = cli("launch", QUICKSTART, "launch.nodes=2", "launch.procs_per_node=4", "launch.rdzv.backend=static",
                 "launch.master_addr=10.1.2.3", "launch.master_port=29400", "launch.node_rank=1", "train.steps=5",
                 "--dry-run")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "# node 0: ranks 0-3" and lines[2] == "# node 1: ranks 4-7" and len(lines) == 4
    for node, command in enumerate(lines[1::2]):
        config, process = read_back(command, monkeypatch)
        assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 4)
        assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("static", "10.1.2.3:29400", "polytrain")
        assert config.rdzv_configs == {"rank": node, "timeout": "600"}
        # the same training command everywhere: the per-node override stays with the launcher
        # ... and the run's name, fixed by the launcher, so that a restart finds the run (launch.max_restarts)
        assert re.fullmatch(r"train\.run_name=quickstart-\d{8}-\d{6}", process[6]), process[6]
        assert process[:6] + process[7:] == [sys.executable, "-u", "-m", "polytrain.cli", "train", str(QUICKSTART),
                                             "launch.nodes=2", "launch.procs_per_node=4", "launch.rdzv.backend=static",
                                             "launch.master_addr=10.1.2.3", "launch.master_port=29400", "train.steps=5"]


def test_c10d_dry_run_is_one_command_for_every_host(cli, monkeypatch, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-a slots=8\ngpu-b slots=8\ngpu-c slots=8\n")
    result = cli("launch", QUICKSTART, "launch.nodes=2", "launch.procs_per_node=8", f"launch.hostfile={hosts}",
                 "launch.rdzv.id=exp7", "launch.rdzv.timeout=90", "--dry-run")
    assert result.code == 0, result.err
    comment, command = result.out.splitlines()
    assert comment == "# on every node (gpu-a, gpu-b; their ranks are assigned as they join): 8 process(es)"
    config, process = read_back(command, monkeypatch)
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node, config.max_restarts) == (2, 2, 8, 0)
    assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "gpu-a:29500", "exp7")
    assert (config.rdzv_configs["join_timeout"], config.rdzv_configs["read_timeout"]) == ("90", "90")
    assert process[-2:] == ["launch.rdzv.id=exp7", "launch.rdzv.timeout=90"]


@pytest.mark.slow
def test_nodes_that_never_arrive_end_with_the_rendezvous_named(tmp_path, free_port):
    """Lone nodes of two-node jobs, side by side: c10d, static node 0, static node 1 (no node 0), and a
    static node 0 whose port another program holds."""
    timeout = 1
    lone = {"c10d": ["launch.rdzv.id=lonely"], "static host": ["launch.rdzv.backend=static"],
            "static guest": ["launch.rdzv.backend=static", "launch.node_rank=1"],
            "busy port": ["launch.rdzv.backend=static"]}
    ports = {name: free_port + i for i, name in enumerate(lone)}
    busy = socket.create_server(("127.0.0.1", ports["busy port"]))  # another program holds node 0's port
    procs = {name: subprocess.Popen([sys.executable, "-m", "polytrain.cli", "launch", str(QUICKSTART), "launch.nodes=2",
                                     "launch.master_addr=127.0.0.1", f"launch.master_port={ports[name]}",
                                     f"launch.rdzv.timeout={timeout}", *overrides],
                                    cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, overrides in lone.items()}
    stderr = {name: proc.communicate(timeout=120)[1] for name, proc in procs.items()}
    busy.close()
    assert_clean_error(subprocess.CompletedProcess([], procs["busy port"].returncode, "", stderr.pop("busy port")),
                       f"node 0 cannot host the static rendezvous 'polytrain' on 127.0.0.1:{ports['busy port']}: "
                       f"port {ports['busy port']} is in use on this machine")
    expected = {
        "c10d": (f"the c10d rendezvous 'lonely' on 127.0.0.1:{ports['c10d']} timed out after",
                 "not all 2 nodes arrived"),
        "static host": (f"the static rendezvous 'polytrain' on 127.0.0.1:{ports['static host']} timed out after",
                        "only 1 of 2 nodes arrived"),
        "static guest": (f"node 1 could not reach the static rendezvous 'polytrain' on "
                         f"127.0.0.1:{ports['static guest']} after", "node 0 never came up"),
    }
    for name, (where, why) in expected.items():
        assert_clean_error(subprocess.CompletedProcess([], procs[name].returncode, "", stderr[name]), where, why)
        waited = re.search(rf"after (\d+) s of waiting \(launch.rdzv.timeout={timeout} s\)", stderr[name])
        # the guest retries its connection: torch gives each attempt the whole timeout
        assert waited and timeout <= int(waited[1]) <= 4 * timeout + 2, stderr[name][-2000:]
        assert "frame #" not in stderr[name]  # torch's C++ stack traces stay out of the launcher's output


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_job_with_its_error(tmp_path, free_port):
    rows = write_images(tmp_path, 8)
    # Rank 1 of 2 reads the second micro-batch of the first step: spoil one of its images.
    first_of_rank_1 = next(DataOrder({"cap": 8}, {"cap": 4}, "fixed", seed=0).slots(StreamState(), rank=1, world_size=2))
    bad = first_of_rank_1.samples["cap"][1]
    (tmp_path / f"{bad}.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    recipe = tiny_recipe(tmp_path, tmp_path / "m.jsonl")[1:]  # without the leading "train"
    started = time.monotonic()
    proc = polytrain("launch", *recipe, "train.steps=50", "launch.procs_per_node=2",
                     f"launch.master_port={free_port}", cwd=tmp_path)
    assert time.monotonic() - started < 120  # stopped at the first step, not after 50
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error.startswith("polytrain: error: rank 1 (local rank 1 on "), error
    assert (f"failed first, exit code 2: DataError: {tmp_path / 'm.jsonl'}:{bad + 1}: {tmp_path / f'{bad}.png'}: "
            f"not a readable image") in error
    assert error.endswith("the launcher stopped the job")
    assert not list(tmp_path.glob("*/checkpoints"))  # no step finished
