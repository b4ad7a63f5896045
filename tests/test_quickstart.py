"""The quick-start recipe end to end, at reduced steps, through the real CLI and DeepSpeed."""

import json
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file

from polytrain.cli import main
from polytrain.config import load_config
from polytrain.platform.data.builtin import dataset_folder, task_manifests
from polytrain.platform.data.datasets import build_datasets
from polytrain.tokenizers.build import patch_tokenizers, text_tokenizer
from tests.helpers import QUICKSTART, polytrain, read_jsonl, wandb_config, wandb_history
from tests.platform.observe.test_report import Rows, black, check_png, drawn_at

pytestmark = pytest.mark.slow

STEPS = 40
SAVE_EVERY = 20
PEAK_TFLOPS = 1.0
"""A stated peak for this CPU, so the run reports MFU."""
SAMPLES_PER_STEP = 32 + 16 + 8


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("runs")
    proc = polytrain("train", QUICKSTART, f"train.steps={STEPS}", "train.warmup_steps=5", "tracking.log_every=5",
                     "data.tasks.text_lm.max_val_samples=32", f"data.cache_dir={data_cache}", f"train.out_dir={out}",
                     "train.run_name=qs", "tracking.wandb.mode=offline", f"train.save_every={SAVE_EVERY}",
                     f"tracking.peak_tflops={PEAK_TFLOPS}", "tracking.log_samples=true", cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "qs", proc


def test_loss_falls(run):
    run_dir, _ = run
    losses = [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]
    assert len(losses) == STEPS // 5
    assert losses[-1] < 0.75 * losses[0]


def test_eval_json_has_every_task_metric(run):
    run_dir, proc = run
    results = json.loads((run_dir / "eval.json").read_text())
    for task in ("image_to_text", "audio_to_text"):
        assert 0.0 <= results[task]["exact_match"] <= 1.0
        assert results[task]["val_loss"] > 0
    assert results["text_lm"]["val_loss"] > 0 and results["text_lm"]["unigram_entropy"] > 0
    assert "image_to_text  exact_match" in proc.stdout  # the table is printed


def test_run_directory_holds_config_and_checkpoint(run):
    run_dir, _ = run
    cfg = load_config(run_dir / "config.yaml")
    assert cfg.train.steps == STEPS and cfg.engine.zero_stage == 2
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * SAMPLES_PER_STEP
    weights = load_file(latest / "model.safetensors")
    assert "embedders.text.table.weight" in weights and "backbone.encoder.blocks.0.attn.qkv.weight" in weights
    assert (latest / "deepspeed" / "zero" / "mp_rank_00_model_states.pt").is_file()
    assert load_config(latest / "config.yaml") == cfg


def test_eval_command_reproduces_the_final_evaluation(run, tmp_path):
    run_dir, _ = run
    proc = polytrain("eval", run_dir, "--out", tmp_path / "again.json", cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    original = json.loads((run_dir / "eval.json").read_text())
    again = json.loads((tmp_path / "again.json").read_text())
    assert again.keys() == original.keys()
    for task, metrics in original.items():
        for metric, value in metrics.items():
            assert again[task][metric] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, metric)


def test_generate_on_the_held_out_manifest_matches_the_evaluation(run, data_cache):
    run_dir, _ = run
    manifest = data_cache / dataset_folder("digits_image") / "val.jsonl"
    proc = polytrain("generate", run_dir, "--task", "image_to_text", "--manifest", manifest, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert len(rows) == 360 and all(ref.startswith("(reference: ") for _, _, ref in rows)
    matches = sum(answer.strip() == ref.removeprefix("(reference: ").removesuffix(")") for _, answer, ref in rows)
    assert matches / 360 == pytest.approx(json.loads((run_dir / "eval.json").read_text())["image_to_text"]
                                          ["exact_match"], abs=1e-9)
    one = manifest.parent / json.loads(manifest.read_text().splitlines()[0])["image"]
    single = polytrain("generate", run_dir, "--task", "image_to_text", "--image", one, "strategy=beam",
                       "num_beams=3", cwd=run_dir.parent)
    assert single.returncode == 0 and len(single.stdout.splitlines()) == 1, single.stderr[-2000:]


@pytest.mark.parametrize("args, fragment", [
    (["--task", "image_to_text", "--image", "nowhere.png"], "--image nowhere.png: no such file"),
    (["--task", "text_lm", "--image", "IMAGE"], "a image segment, but task text_lm of"),
    (["--manifest", "IMAGE"], "the run has 3 tasks whose heads generate text"),  # a lone --image picks its task
    (["--task", "image_to_text", "--image", "IMAGE", "strategy=guess"], "model.heads.decoding.strategy='guess'"),
    (["--task", "image_to_text"], "give the sample's segments"),
])
def test_generate_refuses_bad_input_in_one_line(run, data_cache, capsys, args, fragment):
    run_dir, _ = run
    image = str(data_cache / dataset_folder("digits_image") / "images" / "0000.png")
    code = main(["generate", str(run_dir), *(image if a == "IMAGE" else a for a in args)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and fragment in error[0], error


def test_wandb_offline_run_holds_the_logged_metrics(run):
    run_dir, _ = run
    logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    history = {row["_step"]: row for row in wandb_history(logs[0])}
    local = [row for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]
    for row in local:
        assert history[row["step"]]["loss"] == pytest.approx(row["loss"])
    final = history[STEPS]  # the last step's training metrics and the final eval share one row
    results = json.loads((run_dir / "eval.json").read_text())
    for task, metrics in results.items():
        for metric, value in metrics.items():
            assert final[f"eval/{task}/{metric}"] == pytest.approx(value)


def train_rows(run_dir):
    return [row for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]


def input_tokens_by_sample(run_dir, wanted: set[str]) -> dict[str, int]:
    """Input tokens of the ``wanted`` training samples, from the datasets: a text-LM window is seq_len
    tokens; a seq2seq sample is its source tokens plus its decoder input (bos + target; eos is only a label)."""
    cfg = load_config(run_dir / "config.yaml")
    tokenizers = {"text": text_tokenizer(cfg, (run_dir / "tokenizer" / "tokenizer.json").read_text()),
                  **patch_tokenizers(cfg)}
    tokens = {}
    for task, ds in build_datasets(cfg, "train", tokenizers, task_manifests(cfg)).items():
        if cfg.data.tasks[task].source is None:
            tokens.update({ds[i].sample_id: cfg.data.tasks[task].seq_len for i in range(len(ds))})
            continue
        for record in ds.records:
            if record.sample_id in wanted:
                example = ds.example(record)
                tokens[record.sample_id] = len(example.inputs) + len(example.decoder)
    return tokens


def test_throughput_counts_the_tokens_of_the_samples_logged(run):
    """tokens/s x step time = the input tokens of the window's samples (from the samples log, counted from the
    data); samples/s likewise; MFU = achieved TFLOP/s over the stated peak; memory is the process's RSS."""
    run_dir, _ = run
    logged = read_jsonl(run_dir / "samples" / "rank0.jsonl")
    wanted = {sample for line in logged for ids in line["samples"].values() for sample in ids}
    per_sample = input_tokens_by_sample(run_dir, wanted)
    per_step = {}
    for line in logged:
        per_step[line["step"]] = per_step.get(line["step"], 0) + sum(
            per_sample[sample] for ids in line["samples"].values() for sample in ids)
    previous = 0
    for row in train_rows(run_dir):
        window = range(previous + 1, row["step"] + 1)
        assert row["tokens_per_s"] * row["step_time_s"] == pytest.approx(
            sum(per_step[s] for s in window) / len(window), rel=1e-9)
        assert row["samples_per_s"] * row["step_time_s"] == pytest.approx(SAMPLES_PER_STEP, rel=1e-9)
        assert row["mfu"] == pytest.approx(row["tflops"] / PEAK_TFLOPS, rel=1e-9) and 0 < row["mfu"] < 1
        assert 0.2 < row["memory/rss_gib"] < 64
        previous = row["step"]


def test_start_line_and_wandb_config_record_the_machine(run):
    run_dir, _ = run
    start = read_jsonl(run_dir / "metrics.jsonl")[0]
    assert start["event"] == "start" and start["step"] == 0 and start["config_name"] == "quickstart"
    system = start["system"]
    assert system["hostname"] == socket.gethostname() and system["world_size"] == 1 and system["device"] == "cpu"
    assert system["torch"] == torch.__version__.split("+")[0] and system["deepspeed"]
    config = wandb_config(next((run_dir / "wandb").glob("offline-run-*/run-*.wandb")))
    assert config["system"] == system and config["engine"]["zero_stage"] == 2


def test_progress_bar_shows_loss_tokens_mfu_and_eta(run):
    _, proc = run
    final = [line for line in proc.stderr.replace("\r", "\n").splitlines() if f"{STEPS}/{STEPS}" in line][-1]
    assert "loss=" in final and "tok/s=" in final and "mfu=" in final and "<00:00" in final, final


def test_report_draws_the_logged_curves(run, tmp_path):
    """The PNG holds every logged loss point where the plot's axes put it, and the page the final eval."""
    run_dir, _ = run
    assert main(["report", str(run_dir), "--out", str(tmp_path)]) == 0
    image, axes = check_png(tmp_path / "report.png", run_dir)
    assert list(axes)[:4] == ["training loss", "learning rate", "eval val_loss", "eval exact_match"]
    assert "MFU (%)" in axes and "memory (GiB, largest rank)" in axes
    for row in train_rows(run_dir):
        assert drawn_at(image, axes["training loss"], row["step"], row["loss"], black), row["step"]
    results = json.loads((run_dir / "eval.json").read_text())
    rows = Rows((tmp_path / "report.html").read_text()).rows
    final = {(r[0], r[1]): float(r[2]) for r in rows if len(r) == 3 and r[0] in results}
    assert final == {(t, m): pytest.approx(v, abs=5e-5) for t, ms in results.items() for m, v in ms.items()}
    logged = {r[0] for r in rows}
    assert {"loss", "loss/text_lm", "lr", "tokens_per_s", "mfu", "eval/audio_to_text/exact_match"} <= logged
    assert ["config", "quickstart"] in rows


def test_resume_continues_the_wandb_run_without_a_duplicate_or_missing_step(run, tmp_path, data_cache):
    """Resuming from the step-20 checkpoint of a run that went on to step 40 (as after a crash): the same W&B
    run id goes on, and its newest offline segment holds every logged step once, the resumed ones included."""
    run_dir, _ = run
    copy = tmp_path / "qs"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(f"step_{STEPS:08d}"))
    first = next((copy / "wandb").glob("offline-run-*"))
    run_id = first.name.rsplit("-", 1)[1]
    checkpoint = copy / "checkpoints" / f"step_{SAVE_EVERY:08d}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["wandb_id"] == run_id
    resumed_steps = 25
    proc = polytrain("train", QUICKSTART, f"train.resume={checkpoint}", f"train.steps={resumed_steps}",
                     "train.warmup_steps=5", "tracking.log_every=5", "data.tasks.text_lm.max_val_samples=32",
                     "data.tasks.image_to_text.max_val_samples=64", "data.tasks.audio_to_text.max_val_samples=16",
                     f"data.cache_dir={data_cache}", "tracking.wandb.mode=offline", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((copy / "checkpoints" / f"step_{resumed_steps:08d}" / "trainer_state.json").read_text())
    assert state["wandb_id"] == run_id
    segments = sorted((copy / "wandb").glob("offline-run-*"))
    assert [s.name.rsplit("-", 1)[1] for s in segments] == [run_id, run_id]
    assert [f.name for s in segments for f in s.glob("*.wandb")] == [f"run-{run_id}.wandb"] * 2
    before, after = (wandb_history(s / f"run-{run_id}.wandb") for s in segments)
    logged = list(range(5, resumed_steps + 1, 5))
    assert [row["_step"] for row in after if "loss" in row] == logged
    assert len({row["_step"] for row in after}) == len(after)  # one row per step
    local = train_rows(copy)
    assert [row["step"] for row in local] == logged  # the first attempt's steps 25-40 are gone from the log
    old = {row["_step"]: row["loss"] for row in before if "loss" in row}
    new = {row["_step"]: row["loss"] for row in after if "loss" in row}
    assert {s: new[s] for s in logged if s <= SAVE_EVERY} == {s: old[s] for s in logged if s <= SAVE_EVERY}
    assert new == {row["step"]: pytest.approx(row["loss"]) for row in local}
    starts = [row for row in read_jsonl(copy / "metrics.jsonl") if row.get("event") == "start"]
    assert [row["step"] for row in starts] == [0, SAVE_EVERY] and local[-1]["time"] > starts[-1]["time"]
    results = json.loads((copy / "eval.json").read_text())
    assert after[-1]["eval/text_lm/val_loss"] == pytest.approx(results["text_lm"]["val_loss"])
