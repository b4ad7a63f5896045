"""The slurm backend: the sbatch script, its rendezvous, and its submission.

SLURM is not installed here. The script is checked by bash -n, line by line, and by
running it with stand-ins for scontrol/srun/sbatch that show what they were given. Its
per-node command trains for real in test_two_nodes.py.
"""

import os
import re
import shlex
import subprocess
import sys

from polytrain.launch.slurm import FIRST_NODE
from tests.helpers import QUICKSTART, REPO
from tests.launch.sbatch import node_command

CLUSTER = ("launch.backend=slurm", "launch.nodes=2", "launch.procs_per_node=8", "launch.master_port=29555",
           "launch.slurm.partition=gpu", "launch.slurm.account=proj7", "launch.slurm.time=02:00:00",
           "launch.slurm.cpus_per_node=64", "launch.slurm.sbatch_args=[--exclusive, --qos=high]",
           "launch.slurm.env_setup=[module load cuda/12.4, export POLYTRAIN_SETUP=done]", "launch.rdzv.timeout=900")


def render(cli, tmp_path, *overrides) -> str:
    result = cli("launch", QUICKSTART, *overrides, f"train.out_dir={tmp_path / 'runs'}", "--dry-run")
    assert result.code == 0, result.err
    return result.out


def stand_in(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def test_script_asks_for_the_nodes_and_meets_on_the_first_one(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    script = render(cli, tmp_path, *CLUSTER, "train.steps=100")
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert re.findall(r"^#SBATCH (.*)$", script, re.M) == [
        "--job-name=quickstart", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=64",
        "--time=02:00:00", "--partition=gpu", "--account=proj7", f"--output={tmp_path / 'runs'}/%x-%j.out",
        "--signal=USR1@300", "--requeue", "--open-mode=append", "--exclusive", "--qos=high"]
    lines = script.splitlines()
    order = [lines.index(line) for line in ("module load cuda/12.4", "export POLYTRAIN_SETUP=done",
                                            f"cd {tmp_path}", *FIRST_NODE)]
    assert order == sorted(order)
    assert lines[order[-1] + 8] == "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 \\"
    args = shlex.split(node_command(script).replace("\\\n", ""))
    assert args[:5] == [sys.executable, "-m", "polytrain.cli", "launch", str(QUICKSTART)]
    assert args[5:] == ["train.steps=100", f"train.out_dir={tmp_path / 'runs'}",
                        "train.run_name=quickstart-$SLURM_JOB_ID", "launch.backend=torchrun",
                        "launch.nodes=2", "launch.procs_per_node=8", "launch.rdzv.backend=c10d",
                        "launch.rdzv.id=slurm-$SLURM_JOB_ID", "launch.rdzv.timeout=900",
                        "launch.master_addr=$MASTER_ADDR", "launch.master_port=29555"]


def test_script_runs_srun_with_the_allocations_first_node(cli, tmp_path, monkeypatch):
    """Run the script with stand-ins for scontrol and srun, which this machine does not have: srun runs
    its command once per node with that node's SLURM_NODEID, and `echo` stands in for Python."""
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "job.sbatch"
    script.write_text(render(cli, tmp_path, *CLUSTER, "launch.rdzv.backend=static", "launch.slurm.python=echo"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # the pause lets a reader that stops after the first node close the pipe before the second one is written
    stand_in(bin_dir, "scontrol", '[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] && echo gpu-07 && sleep 0.2 && '
                                  'echo gpu-08')
    stand_in(bin_dir, "srun", 'echo "setup=$POLYTRAIN_SETUP cwd=$PWD options=$1 $2 $3"; shift 3\n'
                              'for node in 0 1; do SLURM_NODEID=$node "$@"; done')
    stand_in(bin_dir, "module", "true")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[07-08]",
           "SLURM_JOB_ID": "4242"}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd="/")
    assert done.returncode == 0, done.stderr
    setup, *nodes = done.stdout.splitlines()
    # env_setup ran, srun starts in the submit folder with one task per node
    assert setup == f"setup=done cwd={tmp_path} options=--nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1"
    settings = ("train.run_name=quickstart-4242 launch.backend=torchrun launch.nodes=2 launch.procs_per_node=8 "
                "launch.rdzv.backend=static "
                "launch.rdzv.id=slurm-4242 launch.rdzv.timeout=900 launch.master_addr=gpu-07 launch.master_port=29555")
    assert nodes == [f"-m polytrain.cli launch {QUICKSTART} train.out_dir={tmp_path / 'runs'} {settings} "
                     f"launch.node_rank={node}" for node in (0, 1)]


def test_a_job_that_stopped_with_a_checkpoint_is_requeued_and_one_that_ended_is_not(cli, tmp_path, monkeypatch):
    """srun stand-ins: one whose processes stop on SIGUSR1 (they leave the stop file and exit 75), one whose job
    ends (0), one whose job fails (1)."""
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "job.sbatch"
    script.write_text(render(cli, tmp_path, *CLUSTER, "launch.slurm.stop_before=120"))
    assert "#SBATCH --signal=USR1@120\n" in script.read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "runs").mkdir()  # polytrain launch makes train.out_dir, where the stop file goes
    stand_in(bin_dir, "scontrol", f'[ "$1" = requeue ] && echo "requeue $2" >> {tmp_path}/requeued; echo gpu-07')
    stand_in(bin_dir, "module", "true")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-07", "SLURM_JOB_ID": "77"}
    for body, code in (('echo "stopped by SIGUSR1 after step 9" > "$POLYTRAIN_STOP_FILE"; exit 75', 75), ("exit 0", 0),
                       ("exit 1", 1)):
        stand_in(bin_dir, "srun", body)
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd="/")
        assert done.returncode == code, done.stderr
    assert (tmp_path / "requeued").read_text() == "requeue 77\n"  # the stopped one only
    assert not list((tmp_path / "runs").glob(".stopped-*"))  # the script cleared the stop file


def test_multinode_recipe_is_a_two_node_slurm_job(cli, tmp_path):
    script = cli("launch", REPO / "configs" / "multinode.yaml", "--dry-run").out
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=1\n#SBATCH --gpus-per-node=8\n" in script
    assert "launch.nodes=2 launch.procs_per_node=8 launch.rdzv.backend=c10d" in node_command(script)


def test_submit_without_sbatch_says_so_and_keeps_the_script(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = cli("launch", QUICKSTART, "launch.backend=slurm", f"train.out_dir={tmp_path / 'runs'}", "--submit")
    script = tmp_path / "runs" / "quickstart.sbatch"
    assert result.code == 2
    assert result.error == (f"--submit: sbatch is not on PATH, so this machine cannot submit SLURM jobs; the script "
                            f"is written to {script}: submit it with `sbatch {script}` on a SLURM login node")
    assert script.read_text().startswith("#!/bin/bash\n")


def test_submit_hands_the_script_to_sbatch(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir, "sbatch", f'printf "%s\\n" "$@" > {tmp_path}/sbatch.args; echo "9876;cluster-a"')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    result = cli("launch", QUICKSTART, "launch.backend=slurm", "launch.slurm.job_name=exp1",
                 "launch.slurm.script=jobs/exp1.sh", "--submit")
    assert result.code == 0, result.err
    assert (tmp_path / "sbatch.args").read_text().splitlines() == ["--parsable", "jobs/exp1.sh"]
    assert result.out.strip() == f"submitted SLURM job 9876: jobs/exp1.sh; log: {tmp_path}/runs/exp1-9876.out"
    assert "#SBATCH --job-name=exp1\n" in (tmp_path / "jobs" / "exp1.sh").read_text()


def test_sbatch_refusing_the_job_is_reported_with_its_reason(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in(bin_dir, "sbatch", 'echo "sbatch: error: invalid partition specified: gpux" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    result = cli("launch", QUICKSTART, "launch.backend=slurm", "launch.slurm.partition=gpux", "--submit")
    assert result.code == 2
    assert result.error == ("sbatch runs/quickstart.sbatch failed with exit code 1: "
                            "sbatch: error: invalid partition specified: gpux")


def test_without_submit_the_script_is_written_with_how_to_submit_it(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("launch", QUICKSTART, "launch.backend=slurm")
    assert result.code == 0, result.err
    assert result.out.strip() == ("wrote runs/quickstart.sbatch; submit it with: sbatch runs/quickstart.sbatch  "
                                  "(or run polytrain launch again with --submit)")
    dry_run = cli("launch", QUICKSTART, "launch.backend=slurm", "--dry-run")
    assert (tmp_path / "runs" / "quickstart.sbatch").read_text() == dry_run.out.removesuffix("\n")
