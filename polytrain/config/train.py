"""The ``train`` and ``finetune`` sections: steps, optimizer and schedule, evaluation, checkpoints, run directory;
where the weights start and which of them train."""

import re
from dataclasses import dataclass, field
from typing import Annotated, Literal

from polytrain.config.model import LoraConfig
from polytrain.errors import ConfigError
from polytrain.schema import Fraction, NonNegative, Positive, Probability, Range

SEEDS = Range(ge=0, le=2**32 - 1, note="the seeds numpy, torch and Python all take")
FP32_MAX = 3.4028234663852886e38
"""The largest finite float32: AdamW's states and step sizes are fp32 in every training precision."""


@dataclass(frozen=True)
class TrainConfig:
    steps: Positive[int] = 1000
    """Optimizer steps (the total, counting steps done before a resume)."""
    lr: Positive[float] = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    warmup_steps: NonNegative[int] = 100
    """Steps of linear warmup from lr/warmup_steps to lr."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear down to lr * min_lr_ratio on the last step, or constant."""
    min_lr_ratio: Probability = 0.1
    """Where cosine and linear decay end, as a fraction of lr."""
    weight_decay: NonNegative[float] = 0.01
    """AdamW decoupled weight decay for matrices (not embeddings, norms or biases)."""
    betas: tuple[Fraction, Fraction] = (0.9, 0.95)
    """AdamW moment decay rates."""
    grad_accum: Positive[int] = 1
    """Micro-batches per optimizer step on each process. Unset in the recipe, the job derives it from
    ``global_batch`` (or a task's ``global_budget``) and its data-parallel processes, or, resuming, from the
    checkpoint's global batch; set, it must agree with them."""
    grad_clip: Annotated[float, Range(ge=0, note="0: no clipping")] = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    global_batch: Annotated[int, Range(gt=0, note="or null: micro-batch x grad_accum x processes")] | None = None
    """Samples per optimizer step over all data-parallel processes (the tasks with a ``batch_size``, not a
    ``budget``): the job splits it into micro-batch x ``grad_accum`` x processes, so the step stays the same on
    any number of processes; one that does not split evenly is an error naming the numbers."""
    seed: Annotated[int, SEEDS] = 0
    """Seeds model init and data order; the same seed gives the same run."""
    eval_every: Annotated[int, Range(ge=0, note="0: only after the last step")] = 0
    """Evaluate every this many steps (0: only after the last step)."""
    eval_batch_size: Positive[int] = 64
    """Held-out samples per evaluation batch."""
    save_every: Annotated[int, Range(ge=0, note="0: only after the last step")] = 0
    """Save a checkpoint every this many steps (0: only after the last step)."""
    out_dir: str = "runs"
    """Run directories are created under this folder."""
    run_name: str | None = None
    """Name of the run directory; null: the config file's name and the start time."""
    resume: str | None = None
    """Continue the run in this run directory (its latest checkpoint) or from this checkpoint folder,
    on any number of processes."""
    max_bad_steps: Positive[int] = 10
    """Stop the run after this many optimizer steps in a row whose loss or gradient norm was not finite; each such
    step is skipped (no weight changes) and logged with its tasks and samples."""
    failed_save: Literal["stop", "continue"] = "stop"
    """A checkpoint that cannot be written (a full disk, a quota): stop, or log it and train on, the next save
    trying again (the last step's checkpoint must be written). ``checkpoints/latest`` keeps naming the previous
    complete one either way."""

    def check(self) -> None:
        if self.lr / (1 - self.betas[0]) > FP32_MAX:
            raise ConfigError("lr", self.lr, f"/ (1 - betas[0]={self.betas[0]}), AdamW's first step size, must be a "
                              f"finite float32 (<= {FP32_MAX:.4g})")
        if self.lr * self.weight_decay >= 1:
            raise ConfigError("weight_decay", self.weight_decay, f"times lr={self.lr} must be < 1: each step multiplies "
                              f"the weights by 1 - lr x weight_decay")
        if self.run_name is not None and (not self.run_name or self.run_name in (".", "..") or "/" in self.run_name):
            raise ConfigError("run_name", self.run_name, "must name one folder under out_dir: not empty, no '/', "
                              "not '.' or '..'")


TimmArg = int | float | bool | str | list[int]

PART = re.compile(r"(embedders\.[\w-]+|backbone\.(encoder|decoder)|lm_head|heads\.[\w-]+)")
"""A part of the model one checkpoint may fill: an embedder, a stack, the untied output, a task's head."""


@dataclass(frozen=True)
class WeightsSource:
    init_from: str | None = None
    """Start from these weights: a run directory (its latest checkpoint), a checkpoint folder or a file written
    by ``polytrain export`` (tensors matched by name); or a Hugging Face or timm ``save_pretrained`` folder, or a
    timm ``.safetensors`` file (with ``timm_model``), whose own config gives the model's architecture. The text
    tokenizer comes along."""
    timm_model: str | None = None
    """The timm model a lone ``.safetensors`` file holds, e.g. ``vit_tiny_patch16_224``."""
    timm_args: dict[str, TimmArg] = field(default_factory=dict)
    """The keyword arguments that timm model was created with (``img_size``, ``patch_size``, ``in_chans``,
    ``embed_dim``, ``depth``, ``num_heads``, ``num_classes``, ...), as ``timm.create_model`` takes them."""

    def check(self) -> None:
        if self.timm_args and not self.timm_model:
            raise ConfigError("timm_args", self.timm_args, "are the arguments of a timm model; name it in timm_model")
        if self.timm_model and not self.init_from:
            raise ConfigError("timm_model", self.timm_model, "describes the file init_from names; set init_from")


@dataclass(frozen=True)
class InitPartsConfig(WeightsSource):
    parts: list[str] = field(default_factory=list)
    """The parts of the model this checkpoint fills: ``embedders.<modality>``, ``backbone.encoder``,
    ``backbone.decoder``, ``lm_head`` (an untied output), ``heads.<task>`` (the checkpoint's own head for that
    task). Its other tensors are ignored, and listed so in ``init_from.json``."""

    def check(self) -> None:
        super().check()
        if not self.init_from:
            raise ConfigError("init_from", self.init_from, "names the checkpoint these parts come from")
        if not self.parts:
            raise ConfigError("parts", self.parts, "needs the parts this checkpoint fills, e.g. [backbone.decoder]")
        for index, part in enumerate(self.parts):
            if not PART.fullmatch(part):
                raise ConfigError(f"parts.{index}", part, "is not a part: embedders.<modality>, backbone.encoder, "
                                  "backbone.decoder, lm_head or heads.<task>")


@dataclass(frozen=True)
class FinetuneConfig(WeightsSource):
    init_parts: dict[str, InitPartsConfig] = field(default_factory=dict)
    """Parts of the model from different checkpoints, by a name of your choice: ``{vision: {init_from: vit.safetensors,
    timm_model: ..., parts: [embedders.image, backbone.encoder]}, language: {init_from: lm/, parts: [...]}}``. Parts
    no checkpoint fills (a projection between widths, cross-attention an LM never had) start as initialized.
    Instead of ``init_from``."""
    freeze: list[str] = field(default_factory=list)
    """Glob patterns of parameter names that do not train (no gradient, no optimizer state)."""
    freeze_until: dict[str, Annotated[int, Range(ge=1, noun="an optimizer step")]] = field(default_factory=dict)
    """Pattern -> optimizer step: matching parameters train only from that step on (gradual unfreezing);
    before it their learning rate is 0. Takes precedence over ``freeze`` for the parameters it matches."""
    lr_scale: dict[str, NonNegative[float]] = field(default_factory=dict)
    """Pattern -> multiplier of the learning rate (e.g. a new embedder at 10x, the backbone at 0.1x);
    the first matching pattern counts, unmatched parameters get 1."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """Low-rank adapters on the targeted linear layers, whose own weights are then frozen."""

    def check(self) -> None:
        super().check()
        if self.init_from and self.init_parts:
            raise ConfigError("init_parts", sorted(self.init_parts), "replaces init_from; set one of the two")
        owners: dict[str, str] = {}
        for name, source in self.init_parts.items():
            for index, part in enumerate(source.parts):
                if part in owners:
                    raise ConfigError(f"init_parts.{name}.parts.{index}", part, f"comes from init_parts.{owners[part]} "
                                      "already; each part has one checkpoint")
                owners[part] = name
