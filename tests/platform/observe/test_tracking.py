"""Tracking without a training run: device peaks, the throughput meter, memory, the JSONL log, the bar."""

import json
import os
import socket

import pytest
import torch

from polytrain.config import load_config
from polytrain.config.tracking import TrackingConfig
from polytrain.errors import ConfigError
from polytrain.platform.observe.meters import (
    GIB,
    TERA,
    Throughput,
    listed_peak,
    matmul_precision,
    memory_gib,
    peak_flops,
)
from polytrain.platform.observe.run_dir import RunDir
from polytrain.platform.observe.tracking import Tracker, keep_until, system_info
from tests.helpers import QUICKSTART, read_jsonl


@pytest.mark.parametrize("name, column, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H100 NVL", "fp16", 835.5),
    ("NVIDIA H200", "tf32", 494.7),
    ("NVIDIA GH200 480GB", "bf16", 989.4),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5),
    ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.05),
    ("Tesla V100-SXM2-32GB", "fp16", 125.0),
    ("Tesla V100-SXM2-32GB", "bf16", None),  # no bf16 on Volta
    ("NVIDIA A10G", "bf16", None),  # not A10, not listed
    ("NVIDIA L40", "bf16", None),  # not L4 or L40S
    ("NVIDIA GeForce RTX 3090", "bf16", None),
])
def test_listed_peaks_by_device_name(name, column, tflops):
    assert listed_peak(name, column) == (None if tflops is None else pytest.approx(tflops * TERA))


def test_fp32_training_reads_the_tf32_column_when_tf32_matmuls_are_allowed():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert matmul_precision("fp32") == "tf32" and matmul_precision("bf16") == "bf16"
        torch.set_float32_matmul_precision("highest")
        assert matmul_precision("fp32") == "fp32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_a_cpu_has_a_peak_only_when_configured():
    assert peak_flops(None, "fp32", torch.device("cpu")) is None
    assert peak_flops(2.5, "fp32", torch.device("cpu")) == 2.5e12


def test_peak_tflops_must_be_positive():
    with pytest.raises(ConfigError, match=r"tracking\.peak_tflops=0"):
        load_config(QUICKSTART, ["tracking.peak_tflops=0"])


def test_throughput_rates_over_the_window():
    meter = Throughput(world_size=2, peak=4 * TERA)
    meter.add(seconds=0.5, samples=8, tokens=100, flops=3 * TERA)
    meter.add(seconds=1.5, samples=8, tokens=300, flops=5 * TERA)
    assert meter.rates() == pytest.approx({"samples_per_s": 16 / 2, "tokens_per_s": 400 / 2, "step_time_s": 1.0,
                                           "tflops": 8 / 2 / 2, "mfu": 8 / 2 / 2 / 4})
    meter.reset()
    meter.add(seconds=2.0, samples=4, tokens=10, flops=None)
    assert meter.rates() == pytest.approx({"samples_per_s": 2.0, "tokens_per_s": 5.0, "step_time_s": 2.0})
    no_peak = Throughput(world_size=1, peak=None)
    no_peak.add(seconds=1.0, samples=1, tokens=1, flops=TERA)
    assert no_peak.rates()["tflops"] == 1.0 and "mfu" not in no_peak.rates()


def test_cpu_memory_is_the_resident_set_the_kernel_reports():
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    assert memory_gib(torch.device("cpu"))["memory/rss_gib"] == pytest.approx(kib * 1024 / GIB, rel=0.05)


def test_system_info_names_the_machine(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    info = system_info(8, torch.device("cpu"))
    assert info["hostname"] == socket.gethostname() and info["world_size"] == 8 and info["nodes"] == 2
    assert info["torch"] == torch.__version__.split("+")[0] and info["devices"] == [f"{os.cpu_count()} CPU cores "
                                                                                     f"({os.uname().machine})"]


def test_resuming_drops_the_lines_an_interrupted_attempt_logged_after_the_checkpoint(tmp_path):
    path = RunDir(tmp_path).metrics
    lines = [{"step": 0, "event": "start"}, {"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.0},
             {"step": 10, "eval/lm/val_loss": 2.5}, {"step": 15, "loss": 1.5}, {"step": 20, "loss": 1.0}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert keep_until(path, 10) == lines[:4]
    assert read_jsonl(path) == lines[:4]
    assert keep_until(tmp_path / "absent.jsonl", 10) == []
    # a process killed in the middle of writing a line leaves it without its newline: the line is dropped
    path.write_text("".join(json.dumps(line) + "\n" for line in lines[:2]) + json.dumps(lines[2])[:9])
    assert keep_until(path, 10) == lines[:2] and read_jsonl(path) == lines[:2]


def test_the_main_process_bar_shows_loss_tokens_mfu_and_eta_and_other_ranks_stay_quiet(tmp_path, capsys):
    cfg = TrackingConfig(progress_bar=True)
    quiet = Tracker(cfg, RunDir(tmp_path / "other"), {}, total_steps=10, active=False)
    quiet.progress(3, 1.0, {"tokens_per_s": 5.0})
    quiet.log(3, {"loss": 1.0})
    quiet.close()
    assert capsys.readouterr().err == "" and not (tmp_path / "other").exists()
    tracker = Tracker(cfg, RunDir(tmp_path), {}, total_steps=10, active=True, start_step=2, config_name="tiny")
    tracker.progress(4, 1.23456, {"tokens_per_s": 12345.0, "mfu": 0.4123})
    tracker.close()
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert "4/10" in bar and "loss=1.235" in bar and "tok/s=12.3k" in bar and "mfu=41.2%" in bar and "<" in bar, bar
    start = read_jsonl(RunDir(tmp_path).metrics)[0]
    assert start["event"] == "start" and start["step"] == 2 and start["config_name"] == "tiny"
