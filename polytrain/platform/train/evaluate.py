"""Held-out evaluation, by what each task's head does.

Every task gets ``val_loss`` (nats per target token, or per sample for a classifier).  Then:

- text a head generates (encoder_decoder; decoder_only over samples with a scored answer):
  ``exact_match``, ``cer`` and ``wer`` (character and word error rates: edit distance over the
  reference length, summed over the held-out set, as ASR reports them);
- language modeling (decoder_only over documents): ``perplexity`` and ``unigram_entropy``, the loss of
  the best model that ignores context;
- classification: ``accuracy``, and per class ``count/<class>`` and ``correct/<class>``;
- masked LM: ``accuracy`` over the masked tokens, and ``baseline_accuracy``, that of always predicting
  the most frequent of them.

Every rank evaluates the whole held-out set (so sharded models stay in step); results are identical
across ranks.
"""

import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from polytrain.config.data import TaskConfig
from polytrain.config.model import DecodingConfig
from polytrain.config.registries import LAYOUTS
from polytrain.models.heads import token_loss
from polytrain.platform.data.loader import eval_batches
from polytrain.tokenizers.text import TextTokenizer
from polytrain.tokens import IGNORE_INDEX, TaskBatch


@torch.no_grad()
def evaluate(model: nn.Module, tasks: dict[str, TaskConfig], datasets: dict[str, Any], text: TextTokenizer,
             device: torch.device, batch_size: int,
             decoding: DecodingConfig = DecodingConfig()) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}``."""
    was_training = model.training
    model.eval()
    results = {}
    for name, task in tasks.items():
        head = model.heads[name]
        tally = Tally()
        for batch in eval_batches(datasets[name], batch_size, task.max_val_samples):
            batch = batch.to(device)
            logits = head(model, batch)
            tally.loss += float(token_loss(logits, batch.labels, reduction="sum"))
            tally.scored += int((batch.labels != IGNORE_INDEX).sum())
            layout = LAYOUTS.get(head.kind.layout)
            if layout.classifies:
                tally.classes(logits.argmax(-1).tolist(), batch.labels.tolist(), task.classes)
            elif layout.masks:
                tally.masked(logits, batch.labels)
            elif batch.source is not None or batch.prompt is not None:
                tally.texts(generate(head, model, batch, text, task.max_target_len + 1, decoding), batch.targets)
            else:
                tally.unigrams.update(batch.labels[batch.labels != IGNORE_INDEX].tolist())
        results[name] = tally.metrics()
    model.train(was_training)
    return results


def generate(head, model, batch: TaskBatch, text: TextTokenizer, max_new_tokens: int,
             decoding: DecodingConfig) -> list[str]:
    """The head's continuation of each sample: after the encoder's source, or after the sample's prompt."""
    if batch.source is not None:
        prompt = torch.full((len(batch), 1), text.bos_id, dtype=torch.long, device=batch.source.values.device)
    else:
        prompt = batch.prompt
    generated = head.generate(model, prompt, batch.source, max_new_tokens, text.eos_id, decoding)
    return [text.decode(cut_at(row.tolist(), text.eos_id)) for row in generated]


class Tally:
    """What one task's held-out batches add up to."""

    def __init__(self):
        self.loss, self.scored = 0.0, 0
        self.samples = self.exact = self.char_edits = self.chars = self.word_edits = self.words = 0
        self.unigrams: Counter = Counter()
        self.per_class: dict[str, list[int]] = {}
        self.masked_correct, self.masked_targets = 0, Counter()

    def texts(self, predictions: list[str], references: list[str]) -> None:
        for prediction, reference in zip(predictions, references):
            prediction, reference = prediction.strip(), reference.strip()
            self.samples += 1
            self.exact += prediction == reference
            self.char_edits += edit_distance(prediction, reference)
            self.chars += len(reference)
            self.word_edits += edit_distance(prediction.split(), reference.split())
            self.words += len(reference.split())

    def classes(self, predicted: list[int], labels: list[int], names: list[str]) -> None:
        for guess, label in zip(predicted, labels):
            counts = self.per_class.setdefault(names[label], [0, 0])
            counts[0] += 1
            counts[1] += guess == label

    def masked(self, logits, labels) -> None:
        scored = labels != IGNORE_INDEX
        self.masked_correct += int((logits.argmax(-1)[scored] == labels[scored]).sum())
        self.masked_targets.update(labels[scored].tolist())

    def metrics(self) -> dict[str, float]:
        metrics = {"val_loss": self.loss / max(self.scored, 1)}
        if self.samples:
            metrics.update(exact_match=self.exact / self.samples, cer=self.char_edits / max(self.chars, 1),
                           wer=self.word_edits / max(self.words, 1))
        if self.unigrams:
            metrics.update(perplexity=math.exp(metrics["val_loss"]), unigram_entropy=entropy(self.unigrams))
        if self.per_class:
            total = sum(count for count, _ in self.per_class.values())
            metrics["accuracy"] = sum(correct for _, correct in self.per_class.values()) / total
            for name, (count, correct) in sorted(self.per_class.items()):
                metrics[f"count/{name}"], metrics[f"correct/{name}"] = count, correct
        if self.masked_targets:
            total = sum(self.masked_targets.values())
            metrics.update(accuracy=self.masked_correct / total,
                           baseline_accuracy=max(self.masked_targets.values()) / total)
        return metrics


def edit_distance(hypothesis, reference) -> int:
    """Levenshtein distance between two sequences (strings: characters; lists: words)."""
    previous = list(range(len(reference) + 1))
    for i, h in enumerate(hypothesis, 1):
        current = [i]
        for j, r in enumerate(reference, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (h != r)))
        previous = current
    return previous[-1]


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
