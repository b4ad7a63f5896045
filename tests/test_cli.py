"""The CLI as a user meets it: clear one-line errors (exit 2, no traceback) for bad configs and data."""

import json
import subprocess

import numpy as np
import pytest
import tokenizers
from PIL import Image

from polytrain.cli import main
from tests.helpers import QUICKSTART, REPO, polytrain


def cli(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI in this process, for mistakes it reports before training starts (as a finished process)."""
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("polytrain: error: ")]
    assert len(error) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in error[0]


@pytest.mark.parametrize("override, fragments", [
    ("train.steps=ten", ["train.steps='ten'", "must be an integer"]),
    ("model.backbone.n_heads=5", ["model.backbone.n_heads=5", "divide dim=192"]),
    ("data.tasks.image_to_text.source=vidoe", ["data.tasks.image_to_text.source='vidoe'", "known: audio, image, text"]),
])
def test_bad_config_exits_2_with_the_key(capsys, override, fragments):
    assert_clean_error(cli(capsys, "train", QUICKSTART, override), *fragments)


def test_a_bad_config_stops_a_fresh_interpreter_the_same_way(tmp_path):
    assert_clean_error(polytrain("train", QUICKSTART, "train.steps=ten", cwd=tmp_path), "train.steps='ten'")


def tiny_recipe(tmp_path, manifest, extra=()):
    """The quick start reduced to one image task read from ``manifest``."""
    return ["train", QUICKSTART, "data.tasks={}", "data.tasks.cap.head=encoder_decoder", "data.tasks.cap.source=image",
            f"data.tasks.cap.train={manifest}", f"data.tasks.cap.val={manifest}", "data.tasks.cap.batch_size=4",
            "train.steps=2", f"train.out_dir={tmp_path}", "tracking.progress_bar=false", *extra]


def write_images(folder, count):
    rows = []
    for i in range(count):
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "target": "seven"}))
    return rows


@pytest.mark.slow
def test_manifest_line_that_is_not_json_names_file_and_line(tmp_path):
    rows = write_images(tmp_path, 4)
    rows.insert(2, '{"image": "x.png", "target": ')
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    proc = polytrain(*tiny_recipe(tmp_path, tmp_path / "m.jsonl"), cwd=tmp_path)
    assert_clean_error(proc, f"{tmp_path / 'm.jsonl'}:3: not valid JSON")


@pytest.mark.slow
def test_corrupt_image_in_a_loader_worker_names_file_and_line(tmp_path):
    rows = write_images(tmp_path, 8)
    (tmp_path / "5.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    proc = polytrain(*tiny_recipe(tmp_path, tmp_path / "m.jsonl", ["data.num_workers=1"]), cwd=tmp_path)
    assert_clean_error(proc, f"{tmp_path / 'm.jsonl'}:6", f"{tmp_path / '5.png'}: not a readable image")


@pytest.mark.slow
def test_skip_bad_samples_trains_through_and_logs_the_skip(tmp_path):
    rows = write_images(tmp_path, 8)
    (tmp_path / "5.png").write_bytes(b"\x89PNG truncated")
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\nnot json at all\n")
    proc = polytrain(*tiny_recipe(tmp_path, tmp_path / "m.jsonl", ["data.skip_bad_samples=true",
                                                                     "train.run_name=skip"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 bad line(s)" in proc.stderr
    assert "skipped bad sample (1 so far)" in proc.stderr and "5.png" in proc.stderr
    assert (tmp_path / "skip" / "eval.json").is_file()


def test_launch_dry_run_prints_the_torchrun_command(tmp_path):
    proc = polytrain("launch", QUICKSTART, "launch.procs_per_node=2", "launch.rdzv.backend=static",
                     "launch.master_port=29999", "train.steps=5", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    command = proc.stdout.strip().splitlines()[-1]
    assert "-m torch.distributed.run --nnodes=1 --nproc-per-node=2 --node-rank=0 --master-addr=127.0.0.1" in command
    assert "--master-port=29999 --rdzv-backend=static" in command
    assert "-m polytrain.cli train" in command and command.endswith("train.steps=5")


def test_tokenizer_train_writes_a_standard_tokenizer_json(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat\n" * 200)
    proc = polytrain("tokenizer", "train", "--input", corpus, "--vocab-size", "300", "--out", tmp_path / "tok",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert hf.get_vocab_size() <= 300  # this corpus runs out of merges first
    assert len(hf.encode(" cat sat").ids) == 2 and hf.decode(hf.encode("the cat").ids) == "the cat"


def test_eval_of_a_folder_that_is_not_a_run(capsys, tmp_path):
    assert_clean_error(cli(capsys, "eval", tmp_path), "no checkpoint")


def test_finetune_from_weights_that_are_not_there_or_not_weights(capsys, tmp_path):
    recipe = REPO / "configs" / "finetune_audio.yaml"
    assert_clean_error(cli(capsys, "finetune", recipe), "finetune.init_from=None", "needs the weights to start from")
    assert_clean_error(cli(capsys, "finetune", recipe, f"init_from={tmp_path / 'pretrain'}"),
                       f"finetune.init_from='{tmp_path / 'pretrain'}': no such file or directory on this machine")
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04 a zip, as torch.save writes")
    assert_clean_error(cli(capsys, "finetune", recipe, f"init_from={tmp_path / 'model.ckpt'}"),
                       "model.ckpt: not a safetensors file, a run directory or a checkpoint folder")


def prepare_args(tmp_path, manifest, *extra):
    """``polytrain data prepare`` of the one-image-task recipe (``tiny_recipe``), in this process."""
    recipe = tiny_recipe(tmp_path, manifest)[1:]
    return ["data", "prepare", recipe[0], "--out", tmp_path / "prepared", "--workers", "1", *recipe[1:], *extra]


def test_data_prepare_names_a_bad_input_and_refuses_a_bad_flag(capsys, tmp_path):
    rows = write_images(tmp_path, 4)
    rows.insert(2, json.dumps({"image": "missing.png", "target": "two"}))
    (tmp_path / "m.jsonl").write_text("\n".join(rows) + "\n")
    assert_clean_error(cli(capsys, *prepare_args(tmp_path, tmp_path / "m.jsonl")), f"{tmp_path / 'm.jsonl'}:3: ",
                       "missing.png: cannot read the image file")
    skipped = cli(capsys, *prepare_args(tmp_path, tmp_path / "m.jsonl", "data.skip_bad_samples=true"))
    assert skipped.returncode == 0 and "data.tasks.cap.train=prepared:" in skipped.stdout
    index = json.loads((tmp_path / "prepared" / "cap" / "train" / "index.json").read_text())
    assert sum(s["rows"] for s in index["shards"].values()) == 4 and index["shards"]["0"]["skipped"] == 1
    assert_clean_error(cli(capsys, *prepare_args(tmp_path, tmp_path / "m.jsonl", "--workers", "-1")),
                       "--workers=-1: must be >= 0")
