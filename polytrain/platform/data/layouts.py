"""How a head's samples are laid out: a record becomes an ``Example``, examples become a ``TaskBatch``.

A head names its layout in its kind (``config.model.HeadKind.layout``); ``config.registries.LAYOUTS`` holds
them, so a plugin head brings its own layout (a ``Layout`` subclass registered under a name of its own) and no
file here compares head names.  ``SequenceDataset`` (``datasets.py``) does the work every layout shares
(reading the segments, tokenizing files, laying out spans) and asks its layout for what differs:

- ``Causal`` (decoder_only): one sequence, bos then every segment in order, scored text carrying the loss;
- ``SeqToSeq`` (encoder_decoder): the inputs to the encoder, bos + the scored text to the decoder;
- ``Classify`` (encoder_classifier): every input segment to the encoder, the sample's class as the target;
- ``Masked`` (masked_lm): text whose masked tokens are the targets.
"""

import torch

from polytrain.errors import DataError
from polytrain.platform.data.datasets import Example, masked_batch
from polytrain.platform.data.manifest import Record
from polytrain.platform.data.sequences import Laid, collate_labels, collate_rows, left_aligned
from polytrain.tokens import IGNORE_INDEX, TaskBatch


class Layout:
    """What differs between heads in laying out and collating samples; ``ds`` is the task's ``SequenceDataset``."""

    documents = False
    """The task may read plain documents as one token stream cut into windows (language modeling)."""
    plain_text_scored = False
    """A manifest line of plain text is a document to learn whole (all of it scored)."""
    encoder_input = True
    """The inputs go to an encoder: a sample that is one file of the task's modality is read alone, unmarked."""
    classifies = False
    """The target is the sample's class (evaluated by accuracy)."""
    masks = False
    """The targets are masked tokens of the input (evaluated by accuracy against the most frequent token)."""

    def example(self, ds, record: Record):
        raise NotImplementedError

    def lengths(self, ds, parts, count, laid) -> tuple[int, ...]:
        """Tokens of each sequence a sample of prepared ``parts`` becomes (``count(modality, d0, d1)`` a file's
        tokens, ``laid(parts)`` a laid-out sequence's): what cost budgets count."""
        inputs = [p for p in parts if not p[1]]
        modality, _, d0, d1 = inputs[0]
        return (count(modality, d0, d1) if ds.plain else min(laid(inputs), ds.budget),)

    def row_sizes(self, ds, examples) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
        """Each example's sizes and the row's budgets, for packing examples into rows."""
        return [(len(e.inputs),) for e in examples], (ds.task.seq_len,)

    def batch(self, ds, examples, groups, inputs, fields: dict, generator) -> TaskBatch:
        """The batch of ``examples`` packed as ``groups`` (their inputs collated as ``inputs``)."""
        raise NotImplementedError

    def prompts(self, ds, records: list[Record], fields: dict) -> TaskBatch:
        """What generation starts from for ``records`` (``polytrain generate``)."""
        raise DataError(f"data.tasks.{ds.name}: head {ds.task.head} does not generate text")


def encoder_example(ds, record: Record):
    """The encoder's input of ``record`` (every segment that is not scored)."""
    inputs = [p for p in record.parts if not p.scored]
    if not inputs:
        raise DataError(f"{record.where}: no input segment (every segment is scored)")
    return ds.sequence(record, inputs, budget=ds.budget)


class Causal(Layout):
    documents = plain_text_scored = True
    encoder_input = False

    def example(self, ds, record: Record):
        """bos, every segment in order (scored text followed by eos), cut to ``seq_len + 1``; shifted."""
        if not any(p.scored for p in record.parts):
            raise DataError(f"{record.where}: no scored segment: mark the text to learn with \"scored\": true")
        full = Laid([ds.text.bos_id], [False])
        prompt = None
        for part in record.parts:
            if part.scored and prompt is None:
                prompt = full.copy()
                self.check_prompt_end(record, prompt)
            ds.add(full, record, part)
        if len(full) > ds.task.seq_len + 1:
            ds.overflow(record.where, f"{len(full)} tokens", str(ds.task.seq_len + 1))
            full = full.cut(ds.task.seq_len + 1)
        inputs, labels = full.shifted()
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError(f"{record.where}: nothing scored is left within seq_len={ds.task.seq_len}")
        return Example(inputs, labels, record.sample_id, ds.target_text(record), prompt=prompt)

    @staticmethod
    def check_prompt_end(record: Record, prompt: Laid) -> None:
        """Generation feeds a prompt's last slot as a token: without span markers, that must be text."""
        if not prompt.marked and prompt.spans and prompt.spans[-1][2] + len(prompt.spans[-1][1]) == len(prompt):
            raise DataError(f"{record.where}: the scored text follows a {prompt.spans[-1][0]} span directly; with "
                            "tokenizers.text.span_markers: false a prompt must end in text (a question, a newline)")

    def lengths(self, ds, parts, count, laid) -> tuple[int, ...]:
        return (min(1 + laid(parts), ds.task.seq_len + 1) - 1,)

    def batch(self, ds, examples, groups, inputs, fields: dict, generator) -> TaskBatch:
        labels = collate_labels([[examples[i].labels for i in group] for group in groups], inputs.values.shape[1])
        ordered = [examples[i] for group in groups for i in group]
        prompts = [[e.prompt] for e in ordered]  # one per sample, packed rows or not: generation reads them
        return TaskBatch(inputs, labels, prompt=left_aligned(collate_rows(prompts, ds.text.pad_id, 1)),
                         bidirectional_spans=ds.task.span_attention == "bidirectional", **fields)

    def prompts(self, ds, records: list[Record], fields: dict) -> TaskBatch:
        """bos and every input segment of each record."""
        laid = []
        for record in records:
            prompt = Laid([ds.text.bos_id], [False])
            for part in record.parts:
                if not part.scored:
                    ds.add(prompt, record, part)
            laid.append([prompt])
        prompt = left_aligned(collate_rows(laid, ds.text.pad_id, 1))
        return TaskBatch(prompt, prompt=prompt, bidirectional_spans=ds.task.span_attention == "bidirectional",
                         **fields)


class SeqToSeq(Layout):
    def example(self, ds, record: Record):
        encoded = encoder_example(ds, record)
        if not any(p.scored for p in record.parts):
            raise DataError(f"{record.where}: no scored segment: the decoder needs the text to produce, marked "
                            "\"scored\": true")
        target = ds.text_ids(record, [p for p in record.parts if p.scored], ds.task.max_target_len,
                             ds.target_overflow)
        full = Laid([ds.text.bos_id, *target, ds.text.eos_id], [False] + [True] * (len(target) + 1))
        decoder, labels = full.shifted()
        return Example(encoded, labels, record.sample_id, ds.target_text(record), decoder=decoder)

    def lengths(self, ds, parts, count, laid) -> tuple[int, ...]:
        target = sum(d0 for m, scored, d0, _ in parts if scored)
        return (*super().lengths(ds, parts, count, laid), min(target, ds.task.max_target_len) + 1)

    def row_sizes(self, ds, examples) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
        return [(len(e.inputs), len(e.decoder)) for e in examples], (ds.budget, ds.task.max_target_len + 1)

    def batch(self, ds, examples, groups, inputs, fields: dict, generator) -> TaskBatch:
        decoder = collate_rows([[examples[i].decoder for i in group] for group in groups], ds.text.pad_id,
                               ds.multiple)
        labels = collate_labels([[examples[i].labels for i in group] for group in groups], decoder.values.shape[1])
        return TaskBatch(decoder, labels, source=inputs, **fields)

    def prompts(self, ds, records: list[Record], fields: dict) -> TaskBatch:
        """The encoder's input of each record; the decoder starts at bos."""
        sources = [[ds.sequence(r, [p for p in r.parts if not p.scored], ds.budget)] for r in records]
        bos = Laid([ds.text.bos_id], [False])
        return TaskBatch(collate_rows([[bos]] * len(records), ds.text.pad_id),
                         source=collate_rows(sources, ds.text.pad_id, 1), **fields)


class Classify(Layout):
    classifies = True

    def example(self, ds, record: Record):
        """The label is the target; scored text (a caption, say) is left out."""
        encoded = encoder_example(ds, record)
        if record.label not in ds.task.classes:
            raise DataError(f"{record.where}: label {record.label!r} is not one of data.tasks.{ds.name}.classes "
                            f"({', '.join(ds.task.classes)})")
        return Example(encoded, ds.task.classes.index(record.label), record.sample_id, record.label)

    def batch(self, ds, examples, groups, inputs, fields: dict, generator) -> TaskBatch:
        ordered = [examples[i] for group in groups for i in group]
        return TaskBatch(inputs, torch.tensor([e.labels for e in ordered]), **fields)


class Masked(Layout):
    documents = masks = True

    def example(self, ds, record: Record):
        encoded = encoder_example(ds, record)
        if any(p.scored for p in record.parts):
            raise DataError(f"{record.where}: masked_lm predicts masked tokens, not a target; drop the scored segment")
        return Example(encoded, None, record.sample_id)

    def batch(self, ds, examples, groups, inputs, fields: dict, generator) -> TaskBatch:
        return masked_batch(inputs, ds.text, ds.task.mask_probability, generator, **fields)
