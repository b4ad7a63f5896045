"""What the conversion tests share: random library models, saving them the library's way, a few training
steps on the polytrain side, reloading the export in the library, and the comparisons."""

from pathlib import Path

import torch
from torch import Tensor, nn

from polytrain.models.convert.external import read_external, write_external
from polytrain.models.heads import text_segment
from polytrain.models.model import PolyModel
from polytrain.tokens import TaskBatch

TOLERANCE = 1e-5
"""Largest |difference| of logits or features allowed between polytrain and the library, fp32 on CPU."""


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with N(0, 0.02) added to every parameter, so no norm weight or bias sits at an initial
    value (ones, zeros) that would hide a tensor mapped to the wrong place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def imported(library_model, folder: Path, task: str) -> PolyModel:
    """``library_model`` saved with ``save_pretrained`` into ``folder``, read back as a polytrain model."""
    library_model.save_pretrained(folder)
    return read_external(folder).build(task).eval()


def max_diff(ours: Tensor, theirs: Tensor, where: Tensor | None = None) -> float:
    """max |ours - theirs| (over the positions ``where`` is true), after checking the comparison is not empty."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    if where is not None:
        ours, theirs = ours[where], theirs[where]
    assert ours.numel() and ours.std() > 1e-3, "a degenerate comparison"
    return float((ours - theirs).abs().max())


def trained(model: PolyModel, task: str, batch: TaskBatch, steps: int = 3) -> PolyModel:
    """``model`` after ``steps`` AdamW steps on ``batch``; checks the loss went down."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model({task: batch})[task]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    return model.eval()


def exported(model: PolyModel, task: str, family: str, folder: Path, auto_class):
    """``model`` written by ``write_external`` and loaded by ``auto_class.from_pretrained``, which must report
    no missing, unexpected or mismatched tensor."""
    write_external(model, task, family, folder)
    library_model, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info
    return library_model.eval()


EOS = 3
"""The end-of-sequence id both sides decode with (the vocabularies of the tiny models are 100 ids)."""


def same_greedy_continuation(model: PolyModel, library_model, prompt_BP: Tensor, new_tokens: int = 8) -> None:
    """polytrain's ``head.generate`` and the library's ``generate(do_sample=False)`` continue alike."""
    ours = model.heads["lm"].generate(model, prompt_BP, None, new_tokens, EOS)
    theirs = library_model.generate(prompt_BP, attention_mask=torch.ones_like(prompt_BP), do_sample=False,
                                    max_new_tokens=new_tokens, eos_token_id=EOS, pad_token_id=EOS)
    assert torch.equal(ours, theirs[:, prompt_BP.shape[1]:]), (ours, theirs)


def causal_lm_round_trip(library_model, family: str, auto_class, tmp_path: Path) -> dict[str, float]:
    """Import a saved causal LM, compare logits on a padded batch and greedy continuations, train a few steps,
    export, reload in the library and compare again; the largest differences, at import and after export."""
    model = imported(library_model, tmp_path / "library", "lm")
    ids_BT = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(1))
    inputs = text_segment(ids_BT)
    inputs.mask[1, 13:] = False  # the second row is padded

    def logits(polytrain_model=None, other=None) -> Tensor:
        with torch.no_grad():
            if other is not None:
                return other(ids_BT, attention_mask=inputs.mask.long()).logits
            return polytrain_model.heads["lm"](polytrain_model, TaskBatch(inputs, ids_BT))

    before = logits(model)
    diffs = {"import": max_diff(before, logits(other=library_model), inputs.mask)}
    same_greedy_continuation(model, library_model, ids_BT[:, :5])
    trained(model, "lm", TaskBatch(text_segment(ids_BT[:, :-1]), ids_BT[:, 1:]))
    after = logits(model)
    assert max_diff(after, before, inputs.mask) > 1e-3, "training changed nothing"
    back = exported(model, "lm", family, tmp_path / "exported", auto_class)
    diffs["export"] = max_diff(after, logits(other=back), inputs.mask)
    same_greedy_continuation(model, back, ids_BT[:, :5])
    return diffs
