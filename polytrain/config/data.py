"""The ``data`` section: the tasks a run trains, each with its head, manifests and batch size."""

from dataclasses import dataclass, field
from typing import Annotated, Literal

from polytrain.config.model import head_kind
from polytrain.config.registries import HEADS, TOKENIZERS
from polytrain.config.tokenizers import BUILT_IN
from polytrain.errors import ConfigError
from polytrain.schema import NonNegative, Positive, Range


@dataclass(frozen=True)
class TaskConfig:
    head: str
    """How the task uses the backbone: a name from the head registry (decoder_only, encoder_decoder,
    encoder_classifier, masked_lm)."""
    train: str
    """Training data: a JSONL manifest's path, ``builtin:<name>/<split>``, or a prepared split (``polytrain data
    prepare``): ``prepared:DIR`` or the folder's path."""
    val: str
    """Held-out manifest, same forms as ``train``."""
    source: str | list[str] | None = None
    """The modalities of the task's input segments besides inline text, one name or a list (image,
    [image, audio], a plugin's): their tokenizers and embedders are built. null: text only."""
    classes: list[str] = field(default_factory=list)
    """encoder_classifier: the class names, in the order of the logits; each sample's ``label`` names one."""
    packing: bool = False
    """Fill each row with whole samples up to ``seq_len`` (and ``max_target_len`` on the decoder side), each
    attending only to itself, positions restarting per sample; LM documents are cut into windows that keep
    their document boundaries."""
    span_attention: Literal["bidirectional", "causal"] = "bidirectional"
    """decoder_only: the tokens of a non-text span (an image's patches) see each other whole (prefix-LM), or
    causally like text."""
    mask_probability: Annotated[float, Range(gt=0, lt=1)] = 0.15
    """masked_lm: the share of real, non-special text tokens selected for prediction (then 80% become the
    tokenizer's mask token, 10% a random regular token, 10% stay), drawn anew for every micro-batch."""
    batch_size: Positive[int] = 8
    """Samples of this task in every micro-batch, per process (unless ``budget`` is set)."""
    budget: Annotated[int, Range(ge=0, note="0: batch_size samples per micro-batch")] = 0
    """Instead of a count of samples: what this task's samples in a micro-batch may cost together, per process
    (see ``budget_cost``); each step takes samples until budget x train.grad_accum x processes is spent, groups
    them by length and deals them to ranks so that their padded costs are even. Needs a prepared split (the
    sizes of its samples are read without decoding them). 0: ``batch_size`` samples."""
    global_budget: Annotated[int, Range(ge=0, note="0: budget x train.grad_accum x processes")] = 0
    """With ``budget``: what this task's samples in one optimizer step cost together over all data-parallel
    processes; the job splits it into ``budget`` x ``train.grad_accum`` x processes, so the step stays the same on
    any number of processes. 0: whatever those give."""
    budget_cost: Literal["tokens", "attention"] = "tokens"
    """What a budget counts per sequence of L tokens (encoder patches and text alike): tokens, L; attention,
    L + L^2 / (6 x model.backbone.dim), attention's score FLOPs beside those of the linear layers."""
    bucket_steps: Positive[int] = 16
    """Budgeted tasks: this many steps' samples are sorted by length together and cut into steps of similar
    lengths (more: less padding; each step still holds a random draw of the stream, in a seeded order)."""
    weight: NonNegative[float] = 1.0
    """Multiplier of this task's mean token loss in the total loss."""
    seq_len: Positive[int] = 128
    """Tokens of one row: an LM window cut from the documents; a decoder_only sequence; the input sequence
    of an encoder head (at most tokenizers.text.max_len). Longer samples follow tokenizers.text.overflow."""
    max_target_len: Positive[int] = 16
    """encoder_decoder: target tokens kept (bos/eos excluded); also the most tokens generated at evaluation
    (decoder_only too)."""
    max_val_samples: Annotated[int, Range(ge=0, note="0 means all")] = 0
    """Evaluate on at most this many held-out samples (0: all)."""

    def check(self) -> None:
        if self.head not in HEADS:
            raise ConfigError("head", self.head, f"unknown head; known: {', '.join(HEADS.names())}")
        for modality in self.modalities:
            if modality not in TOKENIZERS:
                raise ConfigError("source", self.source, f"unknown modality {modality!r}; known: "
                                                         f"{', '.join(TOKENIZERS.names())}")
        kind = head_kind(self.head)
        if kind.classes:
            if len(self.classes) < 2 or len(set(self.classes)) < len(self.classes):
                raise ConfigError("classes", self.classes, f"head {self.head} needs the names of at least two "
                                                           "classes, each once")
        elif self.classes:
            raise ConfigError("classes", self.classes, f"is for encoder_classifier tasks; head {self.head} "
                                                       "predicts text")
        if not kind.sources and self.modalities:
            raise ConfigError("source", self.source, f"{self.head} reads text only; leave source unset")
        if self.global_budget and not self.budget:
            raise ConfigError("global_budget", self.global_budget, "splits into micro-batches of budget; set budget")
        if self.packing and kind.classes:
            raise ConfigError("packing", True, "is for heads that score tokens (decoder_only, encoder_decoder, "
                                               "masked_lm); a classifier scores whole samples")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The non-text modalities of ``source``."""
        names = [] if self.source is None else [self.source] if isinstance(self.source, str) else self.source
        return tuple(dict.fromkeys(name for name in names if name != "text"))


@dataclass(frozen=True)
class DataConfig:
    tasks: dict[str, TaskConfig]
    """Tasks by name; each micro-batch mixes all of them."""
    mixing: Literal["fixed", "sampled"] = "fixed"
    """fixed: every micro-batch holds exactly ``batch_size`` samples of every task. sampled: each
    micro-batch draws sum(batch_size) samples, each from a task with probability batch_size / sum,
    so some micro-batches (and ranks) miss some tasks."""
    cache_dir: str = "build/data"
    """Where the built-in datasets are materialized (relative to the working directory)."""
    num_workers: NonNegative[int] = 0
    """Loader worker processes per rank, which read, decode, tokenize and collate the micro-batches (0: the
    training process does it between steps)."""
    prefetch: Annotated[int, Range(ge=1)] = 2
    """Micro-batches each loader worker keeps ready ahead of the step (with num_workers > 0)."""
    skip_bad_samples: bool = False
    """Replace unreadable samples by the next readable one (counted and logged) instead of stopping."""

    def check(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks", self.tasks, "needs at least one task")
        budgeted = [name for name, task in self.tasks.items() if task.budget]
        if budgeted and self.mixing != "fixed":
            raise ConfigError("mixing", self.mixing, f"tasks with a budget ({', '.join(budgeted)}) fill whole steps; "
                                                     "use fixed mixing")

    @property
    def plugin_modalities(self) -> tuple[str, ...]:
        """The modalities of plugins the tasks read: the text tokenizer adds their span markers to its own."""
        return tuple(m for m in self.modalities if m not in BUILT_IN)

    @property
    def heads(self) -> dict[str, str]:
        """The head of every task."""
        return {name: task.head for name, task in self.tasks.items()}

    @property
    def modalities(self) -> tuple[str, ...]:
        """The non-text modalities the tasks read, in a fixed order (their tokenizers and embedders are built)."""
        return tuple(sorted({m for task in self.tasks.values() for m in task.modalities}))

    @property
    def masks(self) -> bool:
        """Some task's targets are masked tokens of its input (masked_lm): the text tokenizer needs its mask token."""
        return any(head_kind(task.head).masks for task in self.tasks.values())

    @property
    def span_modalities(self) -> tuple[str, ...]:
        """The modalities some task lays out as spans inside text (a decoder_only sequence, an encoder input that
        names text or several modalities), whose markers the text tokenizer needs; an encoder reading one file of
        one modality reads it alone."""
        return tuple(sorted({m for task in self.tasks.values() for m in task.modalities
                             if head_kind(task.head).text_spans or len(task.modalities) > 1
                             or "text" in ([task.source] if isinstance(task.source, str) else task.source or [])}))
