"""What keeps the ranks' collectives in step when their micro-batches differ: every rank runs every part.

Under ZeRO-3 each module's parameters are gathered from all ranks when it runs forward and its gradients are
reduced when they are computed in the backward pass, so a module one rank runs and another does not leaves a
collective waiting for ever.  With sampled mixing, or a task whose samples hold an image only sometimes, ranks'
micro-batches differ in which tasks and which span modalities they hold.  Before every forward pass:

- a task a rank has no sample of runs on a stand-in batch (the Stepper gives it zero loss weight);
- a task's sequence without a span of one of the task's modalities gets a one-token stand-in span of it, placed
  nowhere (its row is -1), so that modality's embedder runs;

and every embedder's output enters the loss times zero (a forward hook), so the gradients of an embedder whose
output was placed nowhere are computed (as zeros) on every rank too.  The model itself (``models/``) knows
nothing of this: a span whose row is -1 is simply not placed.
"""

from dataclasses import replace

import torch
from torch import Tensor, nn

from polytrain.models.embed import Embedded
from polytrain.tokens import Segment, Spans, TaskBatch, Tokens


class StandIns:
    """Stand-ins for what a rank's micro-batch lacks, and the zero-weight term of every embedder's output."""

    def __init__(self, model: nn.Module, batches: dict[str, TaskBatch], modalities: dict[str, tuple[str, ...]]):
        """``model``: the single-device model (its embedders get the hook); ``batches``: a stand-in batch of every
        task; ``modalities``: the non-text modalities each task's sequences may hold spans of."""
        self.batches, self.modalities = batches, modalities
        self.widths = {m: spec.input_dim for m, spec in model.specs.items() if m != "text"}
        self.outputs: list[Tensor] = []
        for embedder in model.embedders.values():
            embedder.register_forward_hook(self.keep)

    def keep(self, module: nn.Module, args, output) -> None:
        if isinstance(output, Embedded) and torch.is_grad_enabled():
            self.outputs.append(output.x_BLE.sum())

    def complete(self, tasks: dict[str, TaskBatch]) -> dict[str, TaskBatch]:
        """Every task's batch (a stand-in where ``tasks`` has none), every sequence with a span of each of its
        task's modalities (a stand-in where it has none)."""
        out = {}
        for task, batch in self.batches.items():
            batch = tasks.get(task, batch)
            widths = {m: self.widths[m] for m in self.modalities[task]}
            if batch.source is not None:  # the encoder's input holds the spans; the decoder reads plain text
                out[task] = replace(batch, source=with_spans(batch.source, widths))
            else:
                out[task] = replace(batch, inputs=with_spans(batch.inputs, widths))
        return out

    def zero_term(self) -> Tensor | float:
        """0 x the sum of every embedder output since the last call: added to the loss, it gives every embedder
        parameter a (zero) gradient."""
        outputs, self.outputs = self.outputs, []
        return 0.0 * sum(outputs) if outputs else 0.0


def with_spans(segment: Segment, widths: dict[str, int]) -> Segment:
    """``segment`` with a one-token stand-in span, placed nowhere, of each modality in ``widths`` it has none of
    (a text sequence only: a file read alone has no spans)."""
    missing = [m for m in widths if m not in segment.spans]
    if segment.modality != "text" or not missing:
        return segment
    spans = dict(segment.spans)
    for modality in missing:
        stand_in = Tokens(torch.zeros(1, widths[modality]), torch.zeros(1, 2, dtype=torch.long), modality)
        spans[modality] = Spans(Segment.collate([stand_in]), torch.tensor([-1]), torch.tensor([0]))
    return replace(segment, spans=dict(sorted(spans.items())))
