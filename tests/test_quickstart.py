"""The quick-start recipe end to end, at reduced steps, through the real CLI and DeepSpeed."""

import json

import pytest
from safetensors.torch import load_file

from polytrain.config import load_config
from tests.helpers import QUICKSTART, polytrain, read_jsonl, wandb_history

pytestmark = pytest.mark.slow

STEPS = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("runs")
    proc = polytrain("train", QUICKSTART, f"train.steps={STEPS}", "train.warmup_steps=5", "tracking.log_every=5",
                     "data.tasks.text_lm.max_val_samples=32", f"data.cache_dir={data_cache}", f"train.out_dir={out}",
                     "train.run_name=qs", "tracking.wandb.mode=offline", cwd=out)
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
    assert state["step"] == STEPS and state["samples_seen"] == STEPS * (32 + 16 + 8)
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
