"""Held-out evaluation: token loss for every task, exact match of greedy decodes, unigram baseline for LM.

Every rank evaluates the whole held-out set (so sharded models stay in step);
results are identical across ranks.
"""

import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from polytrain.models.heads import token_loss
from polytrain.platform.data.config import TaskConfig
from polytrain.platform.data.loader import eval_batches
from polytrain.tokenizers.text import TextTokenizer
from polytrain.tokens import IGNORE_INDEX


@torch.no_grad()
def evaluate(model: nn.Module, tasks: dict[str, TaskConfig], datasets: dict[str, Any], text: TextTokenizer,
             device: torch.device, batch_size: int) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}``; losses in nats per target token."""
    was_training = model.training
    model.eval()
    results = {}
    for name, task in tasks.items():
        head = model.heads[name]
        loss_sum, n_tokens, correct, n_samples = 0.0, 0, 0, 0
        label_counts: Counter = Counter()
        for batch in eval_batches(datasets[name], batch_size, task.max_val_samples, text.pad_id):
            batch = batch.to(device)
            scored = batch.labels != IGNORE_INDEX
            loss_sum += float(token_loss(head(model, batch), batch.labels, reduction="sum"))
            n_tokens += int(scored.sum())
            if head.kind.encoder:
                prompt = torch.full((len(batch), 1), text.bos_id, dtype=torch.long, device=device)
                generated = head.generate(model, prompt, batch.source, task.max_target_len + 1, text.eos_id)
                predictions = [text.decode(cut_at(row.tolist(), text.eos_id)) for row in generated]
                correct += sum(p.strip() == t.strip() for p, t in zip(predictions, batch.targets))
                n_samples += len(batch)
            else:
                label_counts.update(batch.labels[scored].tolist())
        metrics = {"val_loss": loss_sum / n_tokens}
        if head.kind.encoder:
            metrics["exact_match"] = correct / n_samples
        else:
            metrics["perplexity"] = math.exp(metrics["val_loss"])
            metrics["unigram_entropy"] = entropy(label_counts)
        results[name] = metrics
    model.train(was_training)
    return results


def cut_at(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def entropy(counts: Counter) -> float:
    """Entropy in nats of the empirical distribution ``counts``: the loss of the best unigram model."""
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def format_table(results: dict[str, dict[str, float]]) -> str:
    rows = [(task, metric, f"{value:.4f}") for task, metrics in results.items() for metric, value in metrics.items()]
    widths = [max(len(r[i]) for r in rows + [("task", "metric", "value")]) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(("task", "metric", "value")), line(tuple("-" * w for w in widths)), *map(line, rows)])
