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


@pytest.mark.parametrize("override, fragments", [
    # the text embedding alone: 10**11 rows x dim 32 x 4 bytes
    ("tokenizers.text.vocab_size=100000000000", ["tokenizers.text.vocab_size=100000000000: the run needs",
                                                 "parameters 12.8 TB", "per process"]),
    ("data.tasks.text_lm.batch_size=100000000", ["data.tasks.text_lm.batch_size=100000000: the run needs",
                                                 "activations 18.8 TB"]),
    ("model.backbone.encoder_layers=1000000", ["model.backbone.encoder_layers=1000000: the run needs"]),
    ("engine.bucket_size=1000000000000000", ["engine.bucket_size=1000000000000000", "buffers 4 PB"]),
    ("model.backbone.dim=1000000000000 model.backbone.n_heads=1",
     ["model.backbone.dim=1000000000000: the run needs a tensor of more than 2**63 bytes"]),
])
def test_a_run_larger_than_the_machine_names_the_value_before_anything_is_allocated(capsys, monkeypatch, override,
                                                                                       fragments):
    monkeypatch.setattr(preflight.torch.cuda, "is_available", lambda: False)
    proc = cli(capsys, "train", TINY, *override.split())
    memory = preflight.format_bytes(preflight.psutil.virtual_memory().total)
    compared = [] if "2**63" in fragments[0] else [f"and this machine has {memory} of memory per process"]
    assert_clean_error(proc, *fragments, *compared)


def test_folders_the_run_cannot_create_and_too_many_loader_processes_are_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    blocked = tmp_path / "file" / "runs"
    for key in ("train.out_dir", "data.cache_dir"):
        assert_clean_error(cli(capsys, "train", TINY, f"{key}={blocked}"), f"{key}='{blocked}': the run writes there, "
                           f"but {tmp_path / 'file'} is a file, not a folder")
    cores = len(preflight.os.sched_getaffinity(0))
    assert_clean_error(cli(capsys, "train", TINY, f"data.num_workers={cores + 1}"),
                       f"data.num_workers={cores + 1}: is more loader processes", f"use at most {cores}")
