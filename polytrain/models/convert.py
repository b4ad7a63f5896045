"""Weight import and export with timm's ViT and Hugging Face's GPT-2 and BART, by name and shape.

A conversion is a list of ``Rule``s, each tying one polytrain tensor to one or
more tensors of the other checkpoint with the reshape both ways (Conv1D
transposes, fused q/k/v, the patch convolution as a linear map, BART's
position offset, tied copies).  ``import_state`` fills a configured
``PolyModel`` and fails naming the tensor on any missing, unused or misshapen
entry; ``export_state`` writes a plain dict the other library loads with
``load_state_dict(strict=True)`` and that ``safetensors`` can save (no shared
storage).  Configure polytrain like the checkpoint with ``presets.vit``,
``presets.gpt2`` or ``presets.bart``.

Shape legend: E model dim, C channels, p patch side, N patches, V vocabulary.
"""

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from polytrain.errors import PolytrainError


class ConversionError(PolytrainError):
    """A checkpoint does not fit the configured model; the message names the tensor."""


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]
    to_ours: Callable[[list[Tensor]], Tensor]
    to_theirs: Callable[[Tensor], list[Tensor]]


def same(ours: str, theirs: str) -> Rule:
    return Rule(ours, (theirs,), lambda t: t[0], lambda t: [t])


def transposed(ours: str, theirs: str) -> Rule:
    """GPT-2's Conv1D keeps (in, out); ``nn.Linear`` keeps (out, in)."""
    return Rule(ours, (theirs,), lambda t: t[0].t(), lambda t: [t.t()])


def reshaped(ours: str, theirs: str, our_shape: Callable[[Tensor], tuple[int, ...]],
             their_shape: Callable[[Tensor], tuple[int, ...]]) -> Rule:
    """Same numbers in another shape (timm's (1, 1, E) class token, (E, C, p, p) patch convolution)."""
    return Rule(ours, (theirs,), lambda t: t[0].reshape(our_shape(t[0])), lambda t: [t.reshape(their_shape(t))])


def stacked(ours: str, theirs: tuple[str, ...]) -> Rule:
    """One fused polytrain projection from separate ones (q, k, v rows stacked in that order)."""
    return Rule(ours, theirs, lambda t: torch.cat(t, dim=0), lambda t: list(t.chunk(len(theirs), dim=0)))


def tied(ours: str, theirs: tuple[str, ...]) -> Rule:
    """One polytrain tensor that the other checkpoint stores several times; the copies must agree."""

    def to_ours(tensors: list[Tensor]) -> Tensor:
        for name, t in zip(theirs[1:], tensors[1:]):
            if t.shape != tensors[0].shape or not torch.equal(t, tensors[0]):
                raise ConversionError(f"{name} differs from {theirs[0]}; polytrain keeps one tensor "
                                      f"({ours}) for both")
        return tensors[0]

    return Rule(ours, theirs, to_ours, lambda t: [t] * len(theirs))


def tied_with_offset(ours: str, theirs: tuple[str, ...], offset: int) -> Rule:
    """Tied copies whose first ``offset`` rows polytrain does not use (exported as zeros)."""
    check = tied(ours, theirs)
    return Rule(ours, theirs, lambda t: check.to_ours(t)[offset:],
                lambda t: [torch.cat([t.new_zeros(offset, t.shape[1]), t])] * len(theirs))


def import_state(model: nn.Module, state: dict[str, Tensor], rules: list[Rule], source: str,
                 zeros: tuple[str, ...] = ()) -> None:
    """Load ``state`` (a ``source`` checkpoint) into ``model`` through ``rules``.

    ``zeros``: their tensors polytrain has no place for, accepted only when all zero (BART's ``final_logits_bias``).
    """
    expected = model.state_dict()
    loaded = {}
    for rule in rules:
        for name in rule.theirs:
            if name not in state:
                raise ConversionError(f"{source} checkpoint has no {name!r} (polytrain {rule.ours!r} needs it)")
        if rule.ours not in expected:
            raise ConversionError(f"polytrain model has no {rule.ours!r} for {source} {rule.theirs[0]!r}; "
                                  "configure it like the checkpoint")
        tensor = rule.to_ours([state[name] for name in rule.theirs])
        if tensor.shape != expected[rule.ours].shape:
            shapes = ", ".join(f"{name} {tuple(state[name].shape)}" for name in rule.theirs)
            raise ConversionError(f"{source} {shapes} gives {tuple(tensor.shape)} for polytrain {rule.ours!r}, "
                                  f"which is {tuple(expected[rule.ours].shape)}; configure polytrain like the checkpoint")
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


def export_state(model: nn.Module, rules: list[Rule]) -> dict[str, Tensor]:
    """The other library's state dict: every tensor its own contiguous copy (safetensors-safe)."""
    ours = model.state_dict()
    state = {}
    for rule in rules:
        for name, tensor in zip(rule.theirs, rule.to_theirs(ours[rule.ours])):
            state[name] = tensor.detach().clone().contiguous()
    return state


def timm_vit_rules(depth: int, task: str, channels: int) -> list[Rule]:
    """timm ``VisionTransformer`` (class token, ``global_pool="token"``) <-> polytrain encoder classifier.

    The patch convolution's (E, C, p, p) weight flattens to the (E, C*p*p)
    linear map over patches in polytrain's (channel, row, col) feature order.
    """
    def conv_shape(w_EK: Tensor) -> tuple[int, ...]:
        side = int(round((w_EK.shape[1] / channels) ** 0.5))
        return w_EK.shape[0], channels, side, side

    rules = [
        reshaped("embedders.image.cls", "cls_token", lambda t: t.shape[-1:], lambda t: (1, 1, t.shape[0])),
        reshaped("embedders.image.position.table.weight", "pos_embed", lambda t: t.shape[-2:],
                 lambda t: (1, *t.shape)),
        reshaped("embedders.image.proj.weight", "patch_embed.proj.weight", lambda t: (t.shape[0], -1), conv_shape),
        same("embedders.image.proj.bias", "patch_embed.proj.bias"),
        same("backbone.encoder.norm.weight", "norm.weight"),
        same("backbone.encoder.norm.bias", "norm.bias"),
        same(f"heads.{task}.proj.weight", "head.weight"),
        same(f"heads.{task}.proj.bias", "head.bias"),
    ]
    names = {"attn_norm": "norm1", "attn.qkv": "attn.qkv", "attn.out": "attn.proj", "mlp_norm": "norm2",
             "mlp.fc": "mlp.fc1", "mlp.proj": "mlp.fc2"}
    for i in range(depth):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                rules.append(same(f"backbone.encoder.blocks.{i}.{ours}.{kind}", f"blocks.{i}.{theirs}.{kind}"))
    return rules


def hf_gpt2_rules(layers: int) -> list[Rule]:
    """Hugging Face ``GPT2LMHeadModel`` <-> polytrain decoder-only (Conv1D weights transposed, output tied)."""
    rules = [
        tied("embedders.text.table.weight", ("transformer.wte.weight", "lm_head.weight")),
        same("embedders.text.position.weight", "transformer.wpe.weight"),
        same("backbone.decoder.norm.weight", "transformer.ln_f.weight"),
        same("backbone.decoder.norm.bias", "transformer.ln_f.bias"),
    ]
    for i in range(layers):
        ours, theirs = f"backbone.decoder.blocks.{i}", f"transformer.h.{i}"
        for kind in ("weight", "bias"):
            rules += [same(f"{ours}.attn_norm.{kind}", f"{theirs}.ln_1.{kind}"),
                      same(f"{ours}.mlp_norm.{kind}", f"{theirs}.ln_2.{kind}")]
        for our_name, their_name in (("attn.qkv", "attn.c_attn"), ("attn.out", "attn.c_proj"),
                                     ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            rules += [transposed(f"{ours}.{our_name}.weight", f"{theirs}.{their_name}.weight"),
                      same(f"{ours}.{our_name}.bias", f"{theirs}.{their_name}.bias")]
    return rules


BART_POSITION_OFFSET = 2
"""BART's learned position table starts at row 2 (``BartLearnedPositionalEmbedding.offset``)."""


def hf_bart_rules(encoder_layers: int, decoder_layers: int) -> list[Rule]:
    """Hugging Face ``BartForConditionalGeneration`` <-> polytrain encoder-decoder.

    polytrain's text embedder (tokens and positions) serves both stacks, so
    BART's shared token table and its two position tables must agree.
    """
    offset = BART_POSITION_OFFSET
    rules = [
        tied("embedders.text.table.weight", ("model.shared.weight", "model.encoder.embed_tokens.weight",
                                             "model.decoder.embed_tokens.weight", "lm_head.weight")),
        tied_with_offset("embedders.text.position.weight",
                         ("model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"), offset),
    ]
    for stack, n_layers in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        for kind in ("weight", "bias"):
            rules.append(same(f"backbone.{stack}.input_norm.{kind}", f"model.{stack}.layernorm_embedding.{kind}"))
        for i in range(n_layers):
            ours, theirs = f"backbone.{stack}.blocks.{i}", f"model.{stack}.layers.{i}"
            pairs = [("attn_norm", "self_attn_layer_norm"), ("attn.out", "self_attn.out_proj"), ("mlp.fc", "fc1"),
                     ("mlp.proj", "fc2"), ("mlp_norm", "final_layer_norm")]
            if stack == "decoder":
                pairs += [("cross_norm", "encoder_attn_layer_norm"), ("cross.q", "encoder_attn.q_proj"),
                          ("cross.out", "encoder_attn.out_proj")]
            for kind in ("weight", "bias"):
                rules += [same(f"{ours}.{o}.{kind}", f"{theirs}.{t}.{kind}") for o, t in pairs]
                rules.append(stacked(f"{ours}.attn.qkv.{kind}", tuple(f"{theirs}.self_attn.{p}_proj.{kind}"
                                                                       for p in "qkv")))
                if stack == "decoder":
                    rules.append(stacked(f"{ours}.cross.kv.{kind}", tuple(f"{theirs}.encoder_attn.{p}_proj.{kind}"
                                                                           for p in "kv")))
    return rules


BART_ZEROS = ("final_logits_bias",)
"""BART's output bias: a zero buffer in every randomly initialized or fine-tuned-from-scratch model."""


def import_timm_vit(model: nn.Module, state: dict[str, Tensor], task: str, channels: int = 3) -> None:
    """Load a timm ViT state dict into ``model`` (configured by ``presets.vit``), its head into task ``task``."""
    import_state(model, state, timm_vit_rules(len(model.backbone.encoder.blocks), task, channels), "timm ViT")


def export_timm_vit(model: nn.Module, task: str, channels: int = 3) -> dict[str, Tensor]:
    return export_state(model, timm_vit_rules(len(model.backbone.encoder.blocks), task, channels))


def import_hf_gpt2(model: nn.Module, state: dict[str, Tensor]) -> None:
    import_state(model, state, hf_gpt2_rules(len(model.backbone.decoder.blocks)), "GPT-2")


def export_hf_gpt2(model: nn.Module) -> dict[str, Tensor]:
    return export_state(model, hf_gpt2_rules(len(model.backbone.decoder.blocks)))


def import_hf_bart(model: nn.Module, state: dict[str, Tensor]) -> None:
    rules = hf_bart_rules(len(model.backbone.encoder.blocks), len(model.backbone.decoder.blocks))
    import_state(model, state, rules, "BART", zeros=BART_ZEROS)


def export_hf_bart(model: nn.Module) -> dict[str, Tensor]:
    state = export_state(model, hf_bart_rules(len(model.backbone.encoder.blocks), len(model.backbone.decoder.blocks)))
    vocab = state["model.shared.weight"].shape[0]
    state["final_logits_bias"] = torch.zeros(1, vocab)
    return state
