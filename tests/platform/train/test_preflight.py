"""What a config asks of the machine is checked where the job starts, before any process group: one line, exit 2."""

import pytest

from polytrain.platform.train import preflight
from tests.platform.runs import TINY
from tests.test_cli import assert_clean_error, cli


def test_fp16_on_a_cpu_without_fp16_names_the_key_the_cpu_and_what_to_use(capsys, monkeypatch):
    monkeypatch.setattr(preflight, "cpu_has_fp16", lambda: False)
    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: False)
    proc = cli(capsys, "train", TINY, "engine.precision=fp16")
    assert_clean_error(proc, "engine.precision='fp16'", f"CPU ({preflight.cpu_name()})", "bf16 or fp32")


def test_cpu_fp16_support_is_what_onednn_reports():
    import torch

    assert preflight.cpu_has_fp16() == bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())


@pytest.mark.parametrize("override, fragments", [
    ("engine.dist_backend=nccl", ["engine.dist_backend='nccl'", "needs CUDA GPUs, and this machine has none"]),
    ("tokenizers.text.path=/nowhere/tokenizer.json", ["tokenizers.text.path='/nowhere/tokenizer.json'", "no such file"]),
    ("train.resume=/nowhere/run", ["train.resume='/nowhere/run'", "no such file or directory on this machine"]),
])
def test_what_the_machine_lacks_stops_the_run_before_it_starts(capsys, monkeypatch, override, fragments):
    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: False)
    assert_clean_error(cli(capsys, "train", TINY, override), *fragments)
