"""The deepspeed backend: the printed command as DeepSpeed's own runner reads it.

More than one node goes through pdsh/ssh, which this machine cannot test; DeepSpeed's
parser and its resource selection (the same functions its runner calls) check what
the command asks for.
"""

import shlex
import sys

from deepspeed.launcher.runner import apply_num_nodes_and_gpus, fetch_hostfile, parse_args, parse_inclusion_exclusion

from tests.helpers import QUICKSTART

RUNNER = [sys.executable, "-m", "deepspeed.launcher.runner"]


def test_multi_node_command_uses_the_hostfile_hosts_deepspeed_picks(cli, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("gpu-a slots=8\ngpu-b slots=8\ngpu-c slots=4\n")
    result = cli("launch", QUICKSTART, "launch.backend=deepspeed", "launch.nodes=2", "launch.procs_per_node=4",
                 f"launch.hostfile={hosts}", "launch.master_port=29444", "train.steps=9", "--dry-run")
    assert result.code == 0, result.err
    *comments, command = result.out.splitlines()
    argv = shlex.split(command)
    assert argv[:3] == RUNNER
    args = parse_args(argv[3:])
    assert (args.hostfile, args.num_nodes, args.num_gpus, args.master_addr, args.master_port) == (
        str(hosts), 2, 4, "", 29444)
    assert args.module and args.no_local_rank and args.user_script == "polytrain.cli"
    assert args.user_args[2].startswith("train.run_name=quickstart-")  # one name for every process, fixed here
    assert args.user_args[:2] + args.user_args[3:] == ["train", str(QUICKSTART), "launch.backend=deepspeed", "launch.nodes=2",
                              "launch.procs_per_node=4", f"launch.hostfile={hosts}", "launch.master_port=29444",
                              "train.steps=9"]
    # DeepSpeed's runner selects the hosts and slots these calls return
    chosen = apply_num_nodes_and_gpus(parse_inclusion_exclusion(fetch_hostfile(args.hostfile), "", ""),
                                      args.num_nodes, args.num_gpus)
    assert dict(chosen) == {"gpu-a": [0, 1, 2, 3], "gpu-b": [0, 1, 2, 3]}
    assert comments == ["# DeepSpeed starts these nodes over ssh/pdsh", "# node 0 (gpu-a): ranks 0-3",
                        "# node 1 (gpu-b): ranks 4-7"]


def test_one_node_needs_no_hostfile(cli):
    result = cli("launch", QUICKSTART, "launch.backend=deepspeed", "launch.procs_per_node=2",
                 "launch.master_addr=127.0.0.1", "--dry-run")
    assert result.code == 0, result.err
    comments, command = result.out.splitlines()[:-1], result.out.splitlines()[-1]
    args = parse_args(shlex.split(command)[3:])
    assert (args.hostfile, args.num_nodes, args.num_gpus, args.master_addr) == ("/job/hostfile", 1, 2, "127.0.0.1")
    assert comments == ["# this machine", "# node 0: ranks 0-1"]
