"""Rules that tie each polytrain tensor to tensors of another library's checkpoint, and loading by them.

A conversion is a list of ``Rule``s, each tying one polytrain tensor to one or
more tensors of the other checkpoint with the reshape both ways (Conv1D
transposes, fused q/k/v, the patch convolution as a linear map, BART's
position offset, tied copies).  ``import_state`` fills a ``PolyModel`` and
fails naming the tensor and both shapes on any missing, unused or misshapen
entry; ``export_state`` writes a plain dict the other library loads with
``load_state_dict(strict=True)`` (or, leaving out the copies that library ties
itself, a ``save_pretrained`` file) and that ``safetensors`` can save.

Shape legend: R rows, E model dim.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from polytrain.errors import PolytrainError


class ConversionError(PolytrainError):
    """A checkpoint does not fit the configured model, or a model its target library; the message says where."""


class NoPlace(ConversionError):
    """A model's tensors a library's class has no place for: the class is not one of this model's shape."""


@dataclass(frozen=True)
class Rule:
    ours: str
    """The polytrain state-dict name."""
    theirs: tuple[str, ...]
    """The other checkpoint's tensors it is made of, and written back to."""
    to_ours: Callable[[list[Tensor]], Tensor]
    """Their tensors (those present, in ``theirs`` order) -> ours."""
    to_theirs: Callable[[Tensor], list[Tensor]]
    """Ours -> one tensor per name of ``theirs``."""
    restored: tuple[str, ...] = ()
    """Names of ``theirs`` the other library ties to another on loading, so its saved files leave them out."""


def same(ours: str, theirs: str) -> Rule:
    return Rule(ours, (theirs,), lambda t: t[0], lambda t: [t])


def transposed(ours: str, theirs: str) -> Rule:
    """GPT-2's Conv1D keeps (in, out); ``nn.Linear`` keeps (out, in)."""
    return Rule(ours, (theirs,), lambda t: t[0].t(), lambda t: [t.t()])


def reshaped(ours: str, theirs: str, our_shape: Callable[[Tensor], tuple[int, ...]],
             their_shape: Callable[[Tensor], tuple[int, ...]]) -> Rule:
    """Same numbers in another shape (timm's (1, 1, E) class token, (E, C, p, p) patch convolution)."""
    return Rule(ours, (theirs,), lambda t: t[0].reshape(our_shape(t[0])), lambda t: [t.reshape(their_shape(t))])


def stacked(ours: str, theirs: tuple[str, ...], rows: tuple[int, ...] | None = None) -> Rule:
    """One fused polytrain projection from separate ones, their rows stacked in ``theirs`` order.

    ``rows``: the rows of each part (grouped-query q, k, v differ); None: equal parts.
    """
    def split(t: Tensor) -> list[Tensor]:
        return list(t.split(list(rows), dim=0) if rows else t.chunk(len(theirs), dim=0))

    return Rule(ours, theirs, lambda t: torch.cat(t, dim=0), split)


def zero_filled(ours: str, theirs: tuple[str | None, ...], rows: int) -> Rule:
    """A fused projection's bias of which the library has the parts ``theirs`` names, ``rows`` each, and none where
    it is None: zero there on import, left out on export (Whisper's key projections have no bias; a key bias
    moves every score of a query alike, which the softmax ignores, so leaving it out changes no output)."""
    def to_ours(tensors: list[Tensor]) -> Tensor:
        given = iter(tensors)
        return torch.cat([next(given) if name else tensors[0].new_zeros(rows) for name in theirs])

    def to_theirs(t: Tensor) -> list[Tensor]:
        return [part for part, name in zip(t.split(rows), theirs) if name]

    return Rule(ours, tuple(name for name in theirs if name), to_ours, to_theirs)


def tied(ours: str, theirs: tuple[str, ...]) -> Rule:
    """One polytrain tensor the other library ties several of its tensors to; copies in a file must agree.

    The library ties the copies after ``theirs[0]`` itself, so its own files leave them out.
    """
    def to_ours(tensors: list[Tensor]) -> Tensor:
        for name, t in zip(theirs[1:], tensors[1:]):
            if t.shape != tensors[0].shape or not torch.equal(t, tensors[0]):
                raise ConversionError(f"{name} differs from {theirs[0]}; polytrain keeps one tensor "
                                      f"({ours}) for both")
        return tensors[0]

    return Rule(ours, theirs, to_ours, lambda t: [t] * len(theirs), theirs[1:])


def offset_rows(ours: str, theirs: str, offset: int) -> Rule:
    """A table whose first ``offset`` rows polytrain never reads (BART's positions; exported as zeros)."""
    return Rule(ours, (theirs,), lambda t: t[0][offset:],
                lambda t_RE: [torch.cat([t_RE.new_zeros(offset, t_RE.shape[1]), t_RE])])


def import_state(model: nn.Module, state: dict[str, Tensor], rules: list[Rule], source: str,
                 zeros: tuple[str, ...] = ()) -> None:
    """Load ``state`` (a ``source`` checkpoint) into ``model`` through ``rules``.

    ``zeros``: their tensors polytrain has no place for, accepted only when all zero (BART's ``final_logits_bias``).
    """
    expected = model.state_dict()
    loaded = {}
    for rule in rules:
        if rule.ours not in expected:
            raise ConversionError(f"polytrain model has no {rule.ours!r} for {source} {rule.theirs[0]!r}; "
                                  "configure it like the checkpoint")
        want = tuple(expected[rule.ours].shape)
        for name in rule.theirs:
            if name not in state and name not in rule.restored:
                raise ConversionError(f"{source} checkpoint has no {name!r} (polytrain {rule.ours!r} {want} needs it)")
        names = [name for name in rule.theirs if name in state]
        shapes = ", ".join(f"{name} {tuple(state[name].shape)}" for name in names)
        try:
            tensor = rule.to_ours([state[name] for name in names])
        except RuntimeError as err:  # a reshape or concatenation the shapes do not allow
            raise ConversionError(f"{source} {shapes} cannot make polytrain {rule.ours!r} {want}: {err}") from None
        if tuple(tensor.shape) != want:
            raise ConversionError(f"{source} {shapes} gives {tuple(tensor.shape)} for polytrain {rule.ours!r}, "
                                  f"which is {want}; configure polytrain like the checkpoint")
        loaded[rule.ours] = tensor
    for name in zeros:
        if name in state and bool(state[name].any()):
            raise ConversionError(f"{source} {name!r} is not zero; polytrain has no such tensor")
    used = {name for rule in rules for name in rule.theirs} | set(zeros)
    unused = sorted(set(state) - used)
    if unused:
        raise ConversionError(f"{source} tensors polytrain has no place for: {unused[:8]}")
    unfilled = sorted(set(expected) - set(loaded))
    if unfilled:
        raise ConversionError(f"polytrain tensors the {source} checkpoint does not fill: {unfilled[:8]}")
    model.load_state_dict(loaded)


def export_state(model: nn.Module, rules: list[Rule], restored: bool = True) -> dict[str, Tensor]:
    """The other library's state dict, every tensor its own contiguous copy (safetensors-safe).

    ``restored``: include the copies the library ties itself (``load_state_dict(strict=True)`` wants
    them; a ``save_pretrained`` file leaves them out).
    """
    ours = model.state_dict()
    state = {}
    for rule in rules:
        for name, tensor in zip(rule.theirs, rule.to_theirs(ours[rule.ours])):
            if restored or name not in rule.restored:
                state[name] = tensor.detach().clone().contiguous()
    return state
