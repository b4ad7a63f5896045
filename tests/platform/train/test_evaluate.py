"""Held-out metrics against hand-computed values (a stand-in head whose logits are fixed, over fixed labels), and
the masked-LM recipe's through the CLI."""

import json
import math

import pytest
import torch
from torch import nn

from polytrain.config.data import TaskConfig
from polytrain.config.model import HEAD_KINDS
from polytrain.models.heads import text_segment
from polytrain.platform.train.evaluate import evaluate
from polytrain.tokens import IGNORE_INDEX, TaskBatch
from tests.helpers import REPO, polytrain

PROBABILITIES = [0.1, 0.2, 0.3, 0.4]
"""What the stand-in head predicts at every position, whatever it reads: its argmax is token 3."""
X = IGNORE_INDEX
MASKED_LABELS = [[2, X, 2, 3], [X, 1, X, X]]
"""Two held-out rows, evaluated one per batch: tokens 2, 2, 3 and 1 were masked."""


class FixedHead(nn.Module):
    kind = HEAD_KINDS["masked_lm"]

    def forward(self, model, batch: TaskBatch) -> torch.Tensor:
        return torch.tensor(PROBABILITIES).log().expand(*batch.labels.shape, -1)


class Rows(torch.utils.data.Dataset):
    """Held-out samples that collate to one masked_lm batch of their labels (the inputs do not matter)."""

    def __len__(self) -> int:
        return len(MASKED_LABELS)

    def __getitem__(self, index: int) -> list[int]:
        return MASKED_LABELS[index]

    def collate(self, rows: list[list[int]], generator: torch.Generator) -> TaskBatch:
        labels = torch.tensor(rows)
        return TaskBatch(text_segment(torch.zeros_like(labels)), labels)


def test_masked_lm_metrics_are_the_hand_computed_ones():
    model = nn.Module()
    model.heads = nn.ModuleDict({"mlm": FixedHead()})
    task = TaskConfig(head="masked_lm", train="unused", val="unused")
    metrics = evaluate(model, {"mlm": task}, {"mlm": Rows()}, None, torch.device("cpu"), batch_size=1)["mlm"]
    # masked: 2, 2, 3, 1 (IGNORE_INDEX positions are not scored); the head always says 3
    assert metrics == pytest.approx({
        "val_loss": -(2 * math.log(0.3) + math.log(0.4) + math.log(0.2)) / 4,
        "accuracy": 1 / 4,
        "baseline_accuracy": 2 / 4,  # always 2, the most frequent masked token
        # 2 half the time, 1 and 3 a quarter each: -(1/2 ln 1/2 + 2 x 1/4 ln 1/4) nats
        "unigram_entropy": 1.5 * math.log(2),
    }, rel=1e-6)


MLM_STEPS = 150
"""Steps of ``configs/mlm.yaml`` in the end-to-end check (warmup 20), a quarter of the recipe's: at 100 its val_loss
was only just (0.10) below the unigram entropy."""


@pytest.mark.slow
def test_the_masked_lm_recipe_reports_its_baselines_and_beats_them(tmp_path, data_cache):
    proc = polytrain("train", REPO / "configs" / "mlm.yaml", f"train.steps={MLM_STEPS}", "train.warmup_steps=20",
                     f"data.cache_dir={data_cache}",
                     "data.tasks.text_mlm.max_val_samples=256", f"train.out_dir={tmp_path}", "train.run_name=mlm",
                     "tracking.progress_bar=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "mlm" / "eval.json").read_text())["text_mlm"]
    assert sorted(metrics) == ["accuracy", "baseline_accuracy", "unigram_entropy", "val_loss"]
    assert "text_mlm  unigram_entropy" in proc.stdout  # the printed table has it too
    vocab = 512  # the recipe's tokenizers.text.vocab_size
    assert 1 / vocab < metrics["baseline_accuracy"] < 0.1 and 3.0 < metrics["unigram_entropy"] < math.log(vocab)
    assert metrics["accuracy"] > 2 * metrics["baseline_accuracy"]
    assert metrics["val_loss"] < metrics["unigram_entropy"] - 0.2  # 0.38 below when written
