"""Per-rank memory: what a config will need under each ZeRO stage and offload choice, and what a rank holds.

The estimate counts what DeepSpeed allocates for Ψ parameters (Ψt of them trainable) on each of N
data-parallel ranks, with ``low`` bytes per value in the training precision (4 fp32, 2 bf16/fp16),
at the optimizer step, when parameters, gradients and optimizer states all exist:

=====  ===========  ===================================  ==========================================
stage  parameters   gradients                            optimizer states
=====  ===========  ===================================  ==========================================
0      low·Ψ        low·Ψt (+ 4·Ψt fp32 copy if low=2)   8·Ψt Adam moments (+ 4·Ψt fp32 master if low=2)
1      low·Ψ        max(low·Ψt, (low + 4)·Ψt / N)        (8 + 4)·Ψt / N
2      low·Ψ        (low + 4)·Ψt / N                     (8 + 4)·Ψt / N
3      low·Ψ / N    (low + 4)·Ψt / N                     (8 + 4)·Ψt / N
=====  ===========  ===================================  ==========================================

Every ZeRO stage keeps an fp32 master partition and steps it with an fp32 copy of the reduced
gradient partition, even when training in fp32 (measured with DeepSpeed 0.19.8).  Stage 1 holds
whole low-precision gradients until they are reduced at the end of the backward pass, then only
its partition, so its gradient figure is the larger of the two moments.
Stages 2 and 3 also keep one gradient bucket of ``engine.bucket_size`` values.  Optimizer offload
moves the optimizer states and the fp32 gradient copy to CPU memory; parameter offload (stage 3)
moves the parameter partition too.  Activations are an estimate per micro-batch (see
``activation_bytes``); everything else is a count of the tensors DeepSpeed allocates, checked
against ``StateProbe`` measurements by the tests and ``bench/zero_memory.py``.
"""

import math
import re
from dataclasses import dataclass
from typing import Callable

from polytrain.config import Config
from polytrain.config.model import head_kind
from polytrain.errors import ConfigError
from polytrain.platform.observe.meters import GIB
from polytrain.schema import changed_numbers, from_dict, to_dict

USABLE_FRACTION = 0.9
"""Share of a GPU's memory the plan may fill: the CUDA context and allocator fragmentation take the rest."""
ADAM_BYTES = 8
"""Two fp32 moments per trainable parameter."""
FP32_BYTES = 4
"""The fp32 master copy of a trainable parameter, and the fp32 gradient the optimizer steps it with."""


@dataclass(frozen=True)
class Option:
    """One way to run the job: a ZeRO stage and what is offloaded to CPU."""

    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def label(self) -> str:
        offload = [name for name, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on]
        return f"ZeRO-{self.zero_stage}" + (f" + offload {'/'.join(offload)}" if offload else "")


OPTIONS = (Option(0), Option(1), Option(2), Option(3), Option(2, offload_optimizer=True),
           Option(3, offload_optimizer=True), Option(3, offload_optimizer=True, offload_params=True))
"""From the least sharding and traffic to the most: the plan recommends the first that fits."""


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank for one option: on the accelerator, and in CPU memory for what is offloaded."""

    option: Option
    params: int
    grads: int
    optimizer: int
    buffers: int
    activations: int
    cpu: int

    @property
    def device_total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers + self.activations

    @property
    def states(self) -> int:
        """Parameters, gradients and optimizer states wherever they live (what ``measure`` sees on CPU)."""
        return self.params + self.grads + self.optimizer + self.buffers + self.cpu


def format_bytes(count: float) -> str:
    """4.4e15 -> '4.4 PB' (decimal units)."""
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
    exponent = 0
    while count >= 1000 and exponent < len(units) - 1:
        count /= 1000
        exponent += 1
    return f"{count:.3g} {units[exponent]}"


def parse_size(text: str) -> int:
    """'80GB', '80GiB', '40G', '512MB' -> bytes (GB counts as GiB, the way GPU memory is quoted)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError("--gpu-mem", text, "a size like 80GB, 40GiB or 24G")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


Counts = tuple[int, int]
"""(all, trainable) parameters."""
Grids = dict[str, tuple[int, int]]
"""The largest patch grid of each non-text modality's tokens (its tokenizer's ``embed_spec().grid``)."""


def sequence_lengths(cfg: Config, grids: Grids) -> dict[str, tuple[int, int]]:
    """Per task: (encoder tokens, decoder tokens) of one sample at the most."""
    lengths = {}
    for name, task in cfg.data.tasks.items():
        kind = head_kind(task.head)
        if not kind.encoder:  # one sequence, its spans inside it
            lengths[name] = (0, task.seq_len)
            continue
        encoder = task.seq_len
        if len(task.modalities) == 1:  # a single file is read alone
            rows, cols = grids[task.modalities[0]]
            encoder = rows * cols
        lengths[name] = (encoder, task.max_target_len + 1 if kind.decoder else 0)
    return lengths


def activation_bytes(cfg: Config, grids: Grids, sequence_parallel: int | None = None) -> int:
    """Activations one rank keeps for the backward pass of one micro-batch (all tasks), an estimate.

    Per token and block a pre-norm block saves about 10·E values for attention and norms plus
    2·H for the MLP (E model width, H MLP width; SDPA's fused kernels keep no T×T matrix); decoder
    blocks with cross-attention save 4·E more; a tower's blocks likewise at its own widths (counted whether
    or not it is frozen: an upper bound).  Logits and their softmax gradient add 2·V in fp32 per token a text
    head predicts: in training only the labelled ones, which the plan cannot know, so every text token the head
    reads (the decoder's, or a masked LM's) counts: an upper bound.
    Under sequence parallelism (``sequence_parallel``, default engine.sequence_parallel) a rank keeps its slice
    of every backbone sequence: ceil(L / N) tokens each (a tower reads its input whole).
    """
    backbone, vocab = cfg.model.backbone, cfg.tokenizers.text.vocab_size
    low = 4 if cfg.engine.precision == "fp32" else 2
    block = 10 * backbone.dim + 2 * backbone.mlp_hidden
    split = sequence_parallel or cfg.engine.sequence_parallel
    total = 0
    for name, (enc, dec) in sequence_lengths(cfg, grids).items():
        batch = cfg.data.tasks[name].batch_size
        enc, dec = -(-enc // split), -(-dec // split)
        cross = 4 * backbone.dim if enc else 0
        per_sample = (enc * block * backbone.encoder_layers + dec * (block + cross) * backbone.decoder_layers
                      + tower_values(cfg, grids, cfg.data.tasks[name].modalities)) * low
        kind = head_kind(cfg.data.tasks[name].head)
        predicted = dec if kind.decoder else enc if kind.text_output else 0
        total += batch * (per_sample + predicted * 2 * vocab * 4)
    return total


SEQUENCE_PARALLEL_SIZES = (1, 2, 4, 8)
"""The engine.sequence_parallel values the plan shows."""


@dataclass(frozen=True)
class SequencePlan:
    """Per-rank activations of one micro-batch at each sequence-parallel size, and how long a micro-batch fits."""

    tokens: int
    """Tokens of one micro-batch at the configured lengths (all tasks, encoder and decoder)."""
    activations: dict[int, int]
    """engine.sequence_parallel -> bytes per rank."""
    states: Estimate
    """The option whose states the fit is counted against: the recommended one, else ZeRO-3."""
    longest: int
    """Tokens per micro-batch whose activations fit one GPU beside those states, without sequence parallelism."""
    suggested: tuple[int, Estimate] | None
    """When nothing fits as configured: the least engine.sequence_parallel (dividing the GPUs and the heads)
    with which an option without offload fits, and the least sharded such option (else the same with offload)."""


def sequence_plan(cfg: Config, rows: list[Estimate], best: Estimate | None, gpus: int, gpu_mem: int,
                  counts: Counts, grids: Grids) -> SequencePlan:
    """What sequence parallelism buys this config on ``gpus`` GPUs of ``gpu_mem`` bytes for a model of ``counts``
    parameters reading patch ``grids`` (see ``SequencePlan``)."""
    n_params, n_trainable = counts
    lengths = sequence_lengths(cfg, grids)
    tokens = sum(cfg.data.tasks[name].batch_size * (enc + dec) for name, (enc, dec) in lengths.items())
    activations = {n: activation_bytes(cfg, grids, n) for n in SEQUENCE_PARALLEL_SIZES}
    states = best or next(row for row in rows if row.option == Option(3))
    room = USABLE_FRACTION * gpu_mem - (states.device_total - states.activations)
    longest = max(int(room / (activations[1] / max(tokens, 1))), 0) if activations[1] else 0
    suggested = None
    if best is None:  # splitting the sequence before offloading: the all-to-alls cost less than CPU Adam steps
        sizes = [n for n in SEQUENCE_PARALLEL_SIZES[1:] if n <= gpus and gpus % n == 0 and heads_divide(cfg, n)]
        candidates = [(n, option) for offload in (False, True) for n in sizes for option in OPTIONS
                      if option.offload_optimizer == offload]
        suggested = next(((n, row) for n, row in ((n, estimate(cfg, option, gpus, n_params, n_trainable,
                                                                activations[n])) for n, option in candidates)
                          if row.device_total <= USABLE_FRACTION * gpu_mem), None)
    return SequencePlan(tokens, activations, states, longest, suggested)


def heads_divide(cfg: Config, sequence_parallel: int) -> bool:
    try:
        cfg.check_sequence_parallel(sequence_parallel)
    except ConfigError:
        return False
    return True


def tower_values(cfg: Config, grids: Grids, modalities: tuple[str, ...]) -> int:
    """Activations one sample's inputs keep in the towers that read them, as for the backbone's blocks: the
    tokens of the largest input (its modality's grid) plus the class and register tokens, per block at the
    tower's own widths."""
    values = 0
    for modality in modalities:
        tower = cfg.model.towers.get(modality)
        if tower is not None:
            rows, cols = grids[modality]
            tokens = rows * cols + tower.prefix_tokens
            values += tokens * (10 * tower.dim + 2 * tower.mlp_hidden) * tower.built_layers
    return values


def estimate(cfg: Config, option: Option, world_size: int, n_params: int, n_trainable: int,
             activations: int) -> Estimate:
    """Bytes per rank for ``option`` on ``world_size`` data-parallel ranks (see the module docstring)."""
    low = 4 if cfg.engine.precision == "fp32" else 2
    stage, n = option.zero_stage, world_size
    shards = n if stage >= 1 else 1
    fp32_copies = FP32_BYTES if (stage >= 1 or low == 2) else 0  # master weights and the gradient to step them
    params = low * n_params // (n if stage == 3 else 1)
    grads = (low + fp32_copies) * n_trainable // shards
    if stage == 1:  # its gradients are whole until reduced at the end of the backward pass
        grads = max(grads, low * n_trainable)
    optimizer = (ADAM_BYTES + fp32_copies) * n_trainable // shards
    buffers = low * cfg.engine.bucket_size if stage >= 2 else 0
    cpu = 0
    if option.offload_optimizer:
        cpu += optimizer + fp32_copies * n_trainable // shards
        grads -= fp32_copies * n_trainable // shards
        optimizer = 0
    if option.offload_params:
        cpu += params
        params = 0
    return Estimate(option, params, grads, optimizer, buffers, activations, cpu)


def configured(cfg: Config, world_size: int, counts: Counts, grids: Grids) -> Estimate:
    """Bytes per rank of the run as configured (its ZeRO stage and offload) on ``world_size`` ranks for a model of
    ``counts`` parameters reading patch ``grids``; with activation checkpointing only the states are counted."""
    n_params, n_trainable = counts
    option = Option(cfg.engine.zero_stage, cfg.engine.offload_optimizer, cfg.engine.offload_params)
    activations = 0 if cfg.model.backbone.checkpointing else activation_bytes(cfg, grids)
    return estimate(cfg, option, world_size, n_params, n_trainable, activations)


def heaviest(cfg: Config, need: Callable[[Config], float]) -> tuple[str, float] | None:
    """(dotted key, value) of the config number whose default brings ``need`` (bytes; OverflowError: more than
    2**63) the lowest, below what ``cfg`` needs: the value to name when a run does not fit. None if no default helps."""
    def bytes_of(candidate: Config) -> float:
        try:
            return need(candidate)
        except OverflowError:
            return math.inf

    best, lowest = None, bytes_of(cfg)
    for key, value, reset in changed_numbers(cfg):
        try:
            candidate = from_dict(Config, to_dict(reset))
        except ConfigError:  # the default does not fit the other values (n_heads no longer divides dim, ...)
            continue
        needed = bytes_of(candidate)
        if needed < lowest:
            best, lowest = (key, value), needed
    return best


def plan(cfg: Config, gpus_per_node: int, nodes: int, gpu_mem: int, count: Callable[[Config], Counts],
         grids: Grids) -> tuple[list[Estimate], Estimate | None]:
    """Every option's estimate and the first (least sharded) one that fits ``gpu_mem`` per GPU; ``count`` gives a
    config's (all, trainable) parameters (``Job.parameter_counts``)."""
    if gpus_per_node <= 0 or nodes <= 0:
        raise ConfigError("--gpus-per-node/--nodes", (gpus_per_node, nodes), "both must be > 0")
    try:
        n_params, n_trainable = count(cfg)
    except OverflowError as err:
        key, value = heaviest(cfg, lambda c: sum(count(c))) or ("model", None)
        raise ConfigError(key, value, f"the model needs {err}") from None
    activations = activation_bytes(cfg, grids)
    rows = [estimate(cfg, option, gpus_per_node * nodes, n_params, n_trainable, activations) for option in OPTIONS]
    fits = [row for row in rows if row.device_total <= USABLE_FRACTION * gpu_mem]
    return rows, (fits[0] if fits else None)


def format_plan(cfg: Config, rows: list[Estimate], best: Estimate | None, gpus_per_node: int, nodes: int,
                gpu_mem: int, counts: Counts, grids: Grids) -> str:
    n_params, n_trainable = counts
    lines = [f"model: {n_params / 1e6:.2f}M parameters ({n_trainable / 1e6:.2f}M trainable), precision "
             f"{cfg.engine.precision}; {nodes} node(s) x {gpus_per_node} GPU(s) = {nodes * gpus_per_node} ranks, "
             f"{gpu_mem / GIB:.1f} GiB each ({USABLE_FRACTION:.0%} usable)",
             "per-rank GiB: params grads optim buffers activations | GPU total | CPU (offload)"]
    for row in rows:
        mark = "  <- recommended" if row is best else ""
        lines.append(f"  {row.option.label:32s} {row.params / GIB:7.2f} {row.grads / GIB:6.2f} "
                     f"{row.optimizer / GIB:6.2f} {row.buffers / GIB:7.2f} {row.activations / GIB:11.2f} | "
                     f"{row.device_total / GIB:9.2f} | {row.cpu / GIB:6.2f}{mark}")
    if cfg.engine.bucket_size > n_trainable:
        lines.append(f"note: engine.bucket_size={cfg.engine.bucket_size} is more than the trainable parameters; "
                     f"ZeRO-2/3 buffers shrink with engine.bucket_size={max(n_trainable // 4, 1)}")
    sequence = sequence_plan(cfg, rows, best, gpus_per_node * nodes, gpu_mem, counts, grids)
    lines += format_sequence_plan(cfg, sequence)
    if best is None and sequence.suggested is None:
        lines.append("nothing fits: add GPUs, shrink train micro-batches (data.tasks.*.batch_size) or the model")
    elif best is None:
        n, row = sequence.suggested
        lines.append(f"recommended: engine.sequence_parallel={n} {option_keys(row.option)} (per-rank GPU total "
                     f"{row.device_total / GIB:.2f} GiB)")
    else:
        lines.append(f"recommended: {option_keys(best.option)}")
    return "\n".join(lines)


def option_keys(option: Option) -> str:
    return (f"engine.zero_stage={option.zero_stage} engine.offload_optimizer={str(option.offload_optimizer).lower()} "
            f"engine.offload_params={str(option.offload_params).lower()}")


def format_sequence_plan(cfg: Config, sequence: SequencePlan) -> list[str]:
    """The activations at each sequence-parallel size, and the length beyond which one GPU needs it."""
    sizes = " | ".join(f"N={n} {b / GIB:.2f}" for n, b in sequence.activations.items())
    states = sequence.states.device_total - sequence.states.activations
    longer = ", ".join(f"N={n} up to {n * sequence.longest:,}" for n in SEQUENCE_PARALLEL_SIZES[1:])
    return [f"sequence parallel: per-rank GiB of activations of one micro-batch ({sequence.tokens:,} tokens) with "
            f"engine.sequence_parallel=N (configured: {cfg.engine.sequence_parallel}): {sizes}",
            f"with {sequence.states.option.label} states ({states / GIB:.2f} GiB per GPU), one GPU holds the "
            f"activations of a micro-batch of up to {sequence.longest:,} tokens; longer needs sequence parallelism "
            f"({longer}) or activation checkpointing (model.backbone.checkpointing=true)"]
