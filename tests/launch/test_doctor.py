"""polytrain doctor: versions as the packages report them, GPUs as torch sees them, ops that really work."""

import os
import re
import shutil

import accelerate
import deepspeed
import torch
import transformers
import wandb

from tests.helpers import QUICKSTART


def rows(out: str) -> dict[str, str]:
    """The ``name  value`` table at the top of the doctor's report (columns apart by 2+ spaces)."""
    table = out.split("\nchecks for ")[0]
    return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in table.splitlines())


def test_versions_gpus_and_the_ops_the_config_needs(cli, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\n")
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    result = cli("doctor", QUICKSTART, "engine.offload_optimizer=true", "launch.backend=slurm")
    assert result.code == 0, result.out + result.err
    found = rows(result.out)
    for module in (torch, deepspeed, accelerate, transformers, wandb):
        assert found[module.__name__] == module.__version__
    assert found["GPUs"] == str(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert found["CPU cores"] == str(os.cpu_count())
    if torch.version.cuda:
        assert found["CUDA"].startswith(f"{torch.version.cuda} (torch build)")
    checks = [line.split(None, 1) for line in result.out.splitlines() if line.startswith("  ok") or "FAIL" in line]
    assert [status for status, _ in checks] == ["ok"] * len(checks)
    names = [detail.split(":")[0] for _, detail in checks]
    on_cpu = deepspeed.get_accelerator().device_name() == "cpu"
    assert names == [*(["DeepSpeed op ShareMemCommBuilder (DeepSpeed's collectives on CPU)"] if on_cpu else []),
                     "DeepSpeed op CPUAdamBuilder (engine.offload_optimizer=true)", "sbatch"]
    assert f"sbatch: {bin_dir / 'sbatch'}" in result.out
    assert result.out.rstrip().endswith(f"all {len(checks)} checks passed")
    # "ok" means the op computes: DeepSpeed's CPU Adam takes the step torch's AdamW takes
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    start = torch.randn(64, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(64, generator=torch.Generator().manual_seed(1))
    params = {}
    for name, make in (("deepspeed", lambda p: DeepSpeedCPUAdam([p], lr=0.1, weight_decay=0.01, adamw_mode=True)),
                       ("torch", lambda p: torch.optim.AdamW([p], lr=0.1, weight_decay=0.01))):
        param = torch.nn.Parameter(start.clone())
        param.grad = grad.clone()
        make(param).step()
        params[name] = param.detach()
    torch.testing.assert_close(params["deepspeed"], params["torch"], rtol=1e-6, atol=1e-7)


def test_hostfile_and_rendezvous_host(cli, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=4\n127.0.0.1 slots=2\n")
    fits = cli("doctor", QUICKSTART, "launch.nodes=2", "launch.procs_per_node=2", f"launch.hostfile={hosts}").out
    assert "  ok    launch.hostfile: localhost (4 slots), 127.0.0.1 (2 slots)\n" in fits
    assert "  ok    launch.master_addr: localhost is " in fits  # the first host hosts the rendezvous
    too_few = cli("doctor", QUICKSTART, "launch.nodes=2", "launch.procs_per_node=4", f"launch.hostfile={hosts}")
    assert f"  FAIL  launch.hostfile: {hosts}:2: 127.0.0.1 has slots=2, fewer than launch.procs_per_node=4\n" \
        in too_few.out and too_few.code == 1
    nowhere = cli("doctor", QUICKSTART, "launch.master_addr=no-such-host.invalid")
    assert "  FAIL  launch.master_addr: no-such-host.invalid does not resolve" in nowhere.out and nowhere.code == 1


def test_failed_checks_are_listed_and_exit_1(cli, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("worker-0 slots=8\nworker-0 slots=8\n")
    result = cli("doctor", QUICKSTART, "launch.backend=deepspeed", "launch.nodes=2", f"launch.hostfile={hosts}")
    lines = result.out.splitlines()
    assert f"  FAIL  launch.hostfile: {hosts}:2: host 'worker-0' is already listed on line 1" in lines
    tools = {"pdsh": shutil.which("pdsh"), "ssh": shutil.which("ssh")}
    for tool, path in tools.items():
        assert (f"  ok    {tool}: {path}" if path else f"  FAIL  {tool}: not on PATH") in "\n".join(lines)
    failed = ["launch.hostfile", *(tool for tool, path in tools.items() if path is None)]
    assert result.code == 1
    assert lines[-1].startswith(f"{len(failed)} of ") and lines[-1].endswith(f"checks failed: {', '.join(failed)}")


def test_doctor_without_a_config_checks_the_defaults(cli):
    result = cli("doctor")
    assert result.code == 0, result.out
    assert "checks for the default settings (engine.zero_stage=2, launch.backend=torchrun, 1 node(s) x 1 process(es))"\
        in result.out
    assert "CPUAdamBuilder" not in result.out  # no optimizer offload by default
