"""The job: a recipe and its overrides (or a run directory) resolved once into what every command uses.

``resolve`` is the one way from a recipe to a run's parts: ``train``, ``finetune``, ``launch``, ``plan``,
``doctor`` and ``data prepare`` call it, and ``Job.of_run`` is the door from a run directory for ``eval``,
``generate`` and ``export``, so no two commands can see a different model, tokenizer or batch.  In order:

1. the recipe and its overrides, presets expanded, every section checked and then the checks across sections
   (``polytrain.config``);
2. the checkpoints ``finetune.init_from`` / ``init_parts`` name, opened (configs only), and what their own configs
   say about the parts they fill merged under the recipe's keys (``platform/train/derive.py``), a contradiction
   being one line naming both values;
3. where a resumed or restarted run continues from;
4. the batch arithmetic: the global batch (or each task's global budget) a recipe states, or the one the resumed
   checkpoint trained with, split over the job's data-parallel processes into ``train.grad_accum``.

The text tokenizer (the configured file, the checkpoint's, a prepared split's, a resumed run's, or one trained on
the recipe's data and cached) and the model built from it come when asked, so that reading a config for a launch
imports no training stack.  What the machine must offer is checked where the job starts (``check_machine``).
"""

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from polytrain.config import Config, build_config, config_from_yaml, load_tree
from polytrain.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BUILT_BLOCKS = 256
"""Blocks ``Job.parameter_counts`` builds on the meta device (a few ms each); deeper models are extrapolated."""
RESTART_COUNTS = ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
"""How often torchrun restarted this job's processes (launch.max_restarts), and SLURM requeued the job."""


@dataclass(frozen=True)
class Batch:
    """How one optimizer step's samples are split: micro-batches of each process, accumulated, over the
    data-parallel processes."""

    micro: int
    """Samples of the fixed-count tasks in one micro-batch of one process (budgeted tasks are not counted)."""
    accum: int
    """Micro-batches per optimizer step on each process (``train.grad_accum``)."""
    data_parallel: int
    """Processes that each take different samples."""

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.data_parallel


class Job:
    """A resolved recipe: its config (checkpoints' settings merged, ``train.grad_accum`` derived), the checkpoints
    it starts from, where it resumes, and on demand its tokenizer, model and parameter counts."""

    def __init__(self, cfg: Config, name: str, sources: list, processes: int = 1, resume=None, pretrained=None):
        self.cfg, self.name, self.sources, self.processes = cfg, name, sources, processes
        self.resume = resume
        """The checkpoint folder a resumed or restarted run continues from (``CheckpointDir``), or None."""
        self.pretrained = pretrained
        """``Job.of_run``'s weights (``init_from.Pretrained``): a trained run's model, config and tokenizer."""

    @classmethod
    def of_run(cls, path: str | Path) -> "Job":
        """The job a run directory, checkpoint folder or exported file was trained as: its saved (resolved) config,
        LoRA folded away, and its tokenizer; its weights are ``pretrained``'s (``load_weights``)."""
        from polytrain.platform.train.init_from import read_pretrained

        pretrained = read_pretrained(path)
        cfg = config_from_yaml(pretrained.plain_config, f"{path} (its config)")
        return cls(cfg, Path(path).stem, [], pretrained=pretrained)

    @cached_property
    def batch(self) -> Batch:
        return Batch(micro_samples(self.cfg), self.cfg.train.grad_accum, self.processes)

    @cached_property
    def manifests(self):
        """Every task's train and val manifest (or prepared folder), built-in data built on first use."""
        from polytrain.platform.data.builtin import task_manifests

        return task_manifests(self.cfg)

    @property
    def given_tokenizer(self) -> tuple[str, str] | None:
        """(contents, where) of the text tokenizer when something other than training on the recipe's text gives
        it: an exported or resumed run's, the configured file, the checkpoint the text embedder comes from (its
        rows are its ids), a prepared split's (its text is already ids of it). None: polytrain trains one."""
        from polytrain.platform.data.vocabulary import prepared_tokenizer
        from polytrain.platform.train.sources import text_source

        if self.pretrained is not None:
            return self.pretrained.tokenizer_json, str(self.pretrained.path)
        path = self.cfg.tokenizers.text.path or (self.resume.tokenizer if self.resume is not None else None)
        source = text_source(self.sources, self.cfg.data.heads)
        if not path and source is not None:
            return source.tokenizer_json(), source.name
        path = path or prepared_tokenizer(self.manifests)
        return None if path is None else (read_text(Path(path)), str(path))

    @cached_property
    def tokenizer_json(self) -> str:
        """The run's ``tokenizer.json``: the given one, or one trained on the recipe's text (cached, so every
        command and every process of the job gets the same)."""
        from polytrain.platform.data.vocabulary import trained_tokenizer

        given = self.given_tokenizer
        return given[0] if given is not None else read_text(trained_tokenizer(self.cfg, self.manifests))

    @cached_property
    def tokenizers(self) -> dict:
        """The text tokenizer and one per other modality the tasks read."""
        from polytrain.tokenizers.build import text_tokenizer

        return {"text": text_tokenizer(self.cfg, self.tokenizer_json), **self.own_patch_tokenizers}

    @cached_property
    def own_patch_tokenizers(self) -> dict:
        from polytrain.tokenizers.build import patch_tokenizers

        return patch_tokenizers(self.cfg)

    def patch_tokenizers(self, cfg: Config) -> dict:
        """One tokenizer per non-text modality ``cfg``'s tasks read (the job's own are built once)."""
        from polytrain.tokenizers.build import patch_tokenizers

        return self.own_patch_tokenizers if cfg is self.cfg else patch_tokenizers(cfg)

    def grids(self, cfg: Config | None = None) -> dict[str, tuple[int, int]]:
        """Each non-text modality's largest patch grid (for the memory planner's activations)."""
        return {m: tokenizer.embed_spec().grid for m, tokenizer in self.patch_tokenizers(cfg or self.cfg).items()}

    @cached_property
    def tokenizer_sha256(self) -> str:
        """The text tokenizer's digest, as prepared splits record theirs."""
        from polytrain.platform.data.token_store import tokenizer_sha256

        return tokenizer_sha256(self.tokenizers["text"].hf.to_str())

    def build_model(self, device=None, cfg: Config | None = None, exact: bool = True):
        """(model, adapted layers): the model ``cfg`` (default: the job's) describes, sized by the job's tokenizers,
        LoRA adapters included, weights as initialized. ``device="meta"``: shapes only, for counting. ``exact``
        false sizes a vocabulary polytrain has yet to train by ``tokenizers.text.vocab_size``, its upper bound (the
        machine check runs before training it)."""
        import torch

        from polytrain.models.model import PolyModel
        from polytrain.platform.train.finetune import adapt
        from polytrain.tokens import EmbedSpec

        cfg = cfg or self.cfg
        text = cfg.tokenizers.text
        vocab = self.tokenizers["text"].vocab_size if exact or self.given_tokenizer is not None else text.vocab_size
        patches = self.own_patch_tokenizers if cfg is self.cfg else self.patch_tokenizers(cfg)
        specs = [EmbedSpec("text", vocab, (1, text.max_len)), *(t.embed_spec() for t in patches.values())]
        with torch.device(device) if device is not None else nullcontext():
            model = PolyModel(cfg.model, specs, cfg.data.heads,
                              {name: len(task.classes) for name, task in cfg.data.tasks.items() if task.classes})
            adapted = adapt(model, cfg.finetune)
        return model, adapted

    def parameter_counts(self, cfg: Config | None = None, exact: bool = True) -> tuple[int, int]:
        """(all, trainable) parameters of ``cfg``'s model (default: the job's), counted on the meta device, with
        ``finetune.freeze`` applied: what the memory planner sizes (``exact``: see ``build_model``).

        Past ``BUILT_BLOCKS`` blocks, a model with one block per stack and one with two are built and the
        difference extrapolated (every block of a stack holds the same parameters); freezing is then not counted,
        every parameter trains.
        """
        cfg = cfg or self.cfg
        backbone = cfg.model.backbone
        if backbone.encoder_layers + backbone.decoder_layers <= BUILT_BLOCKS:
            return self.counted(cfg, exact)
        shallow = [min(backbone.encoder_layers, 1), min(backbone.decoder_layers, 1)]
        total = self.counted(with_layers(cfg, *shallow), exact)[0]
        for stack, layers in enumerate((backbone.encoder_layers, backbone.decoder_layers)):
            if layers > 1:
                deeper = list(shallow)
                deeper[stack] = 2
                total += (layers - 1) * (self.counted(with_layers(cfg, *deeper), exact)[0] -
                                         self.counted(with_layers(cfg, *shallow), exact)[0])
        return total, total

    def counted(self, cfg: Config, exact: bool) -> tuple[int, int]:
        from polytrain.platform.train.finetune import freeze

        try:
            model, _ = self.build_model("meta", cfg, exact)
        except RuntimeError as err:  # torch refuses a meta tensor of more than 2**63 bytes
            if "overflow" not in str(err):
                raise
            raise OverflowError(f"a tensor of more than 2**63 bytes (torch: {err})") from None
        freeze(model, cfg.finetune)
        return (sum(p.numel() for p in model.parameters()),
                sum(p.numel() for p in model.parameters() if p.requires_grad))

    def trained_model(self):
        """``Job.of_run``'s model, its trained weights loaded (LoRA folded in)."""
        from polytrain.platform.train.init_from import load_weights

        model, _ = self.build_model()
        load_weights(model, self.pretrained.path, self.pretrained.weights())
        return model

    def check_machine(self) -> None:
        """What the config asks of this machine (``platform/train/preflight.py``), before any process group."""
        from polytrain.platform.train.preflight import preflight

        preflight(self)

    def summary(self, counts: tuple[int, int] | None = None) -> str:
        """The line every command that reads a recipe or a run logs: the model's size (``counts``, else counted),
        the text tokenizer, the batch."""
        total, trainable = counts or self.parameter_counts()
        b = self.batch
        return (f"job {self.name}: model {total:,} parameters ({trainable:,} trainable); text tokenizer sha256 "
                f"{self.tokenizer_sha256} ({self.tokenizers['text'].vocab_size} tokens); global batch "
                f"{b.global_batch} = micro-batch {b.micro} x train.grad_accum {b.accum} x {b.data_parallel} "
                f"data-parallel process(es)")


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the tokenizer ({err})") from None


def resolve(path: str | Path | None, overrides: list[str] = (), processes: int | None = None) -> Job:
    """The job of the recipe at ``path`` with ``overrides`` on ``processes`` processes (default: what the launch
    section starts, nodes x procs_per_node; a training process passes its world size)."""
    tree = load_tree(path, overrides)
    cfg = build_config(tree)
    sources = []
    if cfg.finetune.init_from or cfg.finetune.init_parts:
        from polytrain.platform.train.derive import derived_config

        cfg, sources = derived_config(cfg, tree)
    if processes is None:
        processes = cfg.launch.nodes * cfg.launch.procs_per_node
    resume = resume_point(cfg)
    cfg = with_accumulation(cfg, processes, "grad_accum" in (tree.get("train") or {}), resume)
    return Job(cfg, Path(path).stem if path else "run", sources, processes, resume)


def resume_point(cfg: Config):
    """In a restarted or requeued job, the newest checkpoint of the run directory it writes to, if there is one;
    else the latest checkpoint of ``train.resume``; None for a new run."""
    restarts = {name: int(os.environ.get(name) or 0) for name in RESTART_COUNTS}
    if not any(restarts.values()) and not cfg.train.resume:
        return None  # a new run: nothing to read (nor to import)
    from polytrain.platform.distributed.checkpoint import latest_checkpoint
    from polytrain.platform.observe.run_dir import RunDir

    if any(restarts.values()):
        if cfg.train.resume:
            run = latest_checkpoint(cfg.train.resume).run
        elif cfg.train.run_name:
            run = RunDir(Path(cfg.train.out_dir) / cfg.train.run_name)
        else:
            log.warning("this job was restarted (%s), but train.run_name is not set, so it cannot find its run: it "
                        "starts a new one (polytrain launch sets the name)", restarts)
            run = None
        if run is not None and run.latest.is_file():
            if os.environ.get("RANK", "0") == "0":
                log.info("this job was restarted (%s): it resumes from %s",
                         ", ".join(f"{k}={v}" for k, v in restarts.items() if v), run.path)
            return latest_checkpoint(run.path)
    if cfg.train.resume and Path(cfg.train.resume).exists():
        return latest_checkpoint(cfg.train.resume)
    return None  # a train.resume that does not exist is the machine check's to report


def with_layers(cfg: Config, encoder_layers: int, decoder_layers: int) -> Config:
    backbone = replace(cfg.model.backbone, encoder_layers=encoder_layers, decoder_layers=decoder_layers)
    return replace(cfg, model=replace(cfg.model, backbone=backbone))


def micro_samples(cfg: Config) -> int:
    """Samples of the fixed-count (not budgeted) tasks in one micro-batch of one process."""
    return sum(task.batch_size for task in cfg.data.tasks.values() if not task.budget)


def with_accumulation(cfg: Config, processes: int, explicit: bool = False, resume=None) -> Config:
    """``cfg`` with ``train.grad_accum`` split from the global batch on ``processes`` processes.

    The global batch is what a recipe states: ``train.global_batch`` (samples of the fixed-count tasks per step)
    or a budgeted task's ``global_budget`` (cost per step), or, for a resumed run, what its checkpoint trained
    with.  Each stated figure must split evenly into the micro-batch (or budget) x the processes x a whole number
    of accumulation steps, the same number for all; ``train.grad_accum`` set in the recipe (``explicit``) is the
    per-process form and must agree.  Without a global figure accumulation stays as set (default 1).
    """
    train, tasks = cfg.train, cfg.data.tasks
    data_parallel = max(processes, 1)
    micro = micro_samples(cfg)
    implied: list[tuple[str, int, int]] = []  # (key, value, accumulation it implies)
    if train.global_batch is not None:
        if not micro:
            raise ConfigError("train.global_batch", train.global_batch, "counts the samples of the tasks without a "
                              "budget, and every task has one; set data.tasks.<task>.global_budget instead")
        implied.append(("train.global_batch", train.global_batch,
                        split("train.global_batch", train.global_batch, micro, data_parallel,
                              f"micro-batch {micro} ({parts(cfg)})")))
    for name, task in tasks.items():
        if task.global_budget:
            implied.append((f"data.tasks.{name}.global_budget", task.global_budget,
                             split(f"data.tasks.{name}.global_budget", task.global_budget, task.budget, data_parallel,
                                   f"data.tasks.{name}.budget {task.budget}")))
    if resume is not None and not implied:
        return resumed_accumulation(cfg, resume, micro, data_parallel, explicit)
    if explicit:
        implied.append(("train.grad_accum", train.grad_accum, train.grad_accum))
    accums = {accum for _, _, accum in implied}
    if len(accums) > 1:
        described = ", ".join(f"{key}={value} gives {accum}" for key, value, accum in implied)
        raise ConfigError(implied[0][0], implied[0][1], f"implies a different number of accumulation steps per "
                          f"process than the other figures of the step ({described}) on {data_parallel} "
                          "data-parallel process(es); state one of them")
    return replace(cfg, train=replace(train, grad_accum=accums.pop() if accums else train.grad_accum))


def split(key: str, total: int, per_micro: int, data_parallel: int, micro_described: str) -> int:
    """Accumulation steps that make ``total`` of ``per_micro`` per micro-batch on ``data_parallel`` processes."""
    accum, rest = divmod(total, per_micro * data_parallel)
    if rest or not accum:
        raise ConfigError(key, total, f"is not {micro_described} x {data_parallel} data-parallel process(es) x a whole "
                          f"number of accumulation steps (per step: {per_micro * data_parallel})")
    return accum


def parts(cfg: Config) -> str:
    return " + ".join(f"{name} {task.batch_size}" for name, task in cfg.data.tasks.items() if not task.budget)


def resumed_accumulation(cfg: Config, resume, micro: int, data_parallel: int, explicit: bool) -> Config:
    """A resumed run keeps its checkpoint's global batch: accumulation follows from this job's processes (logged
    where it changes); ``train.grad_accum`` set in the recipe (``explicit``) is taken as it is."""
    from polytrain.platform.distributed.checkpoint import read_state

    if explicit:
        return cfg
    saved = read_state(resume.state)
    saved_cfg = config_from_yaml(resume.config.read_text(), f"{resume.path} (its config)")
    saved_accum, saved_processes = saved_cfg.train.grad_accum, saved.get("data_parallel", saved["world_size"])
    budget = next((task.budget for task in cfg.data.tasks.values() if task.budget), 0)
    saved_budget = next((task.budget for task in saved_cfg.data.tasks.values() if task.budget), 0)
    unit, saved_unit = (micro, micro_samples(saved_cfg)) if micro else (budget, saved_budget)
    total = saved_unit * saved_accum * saved_processes
    accum = split("train.grad_accum", total, unit, data_parallel,
                  f"the checkpoint's global batch {total} (micro-batch {saved_unit} x grad_accum {saved_accum} x "
                  f"{saved_processes} process(es)) over micro-batch {unit}")
    if accum != saved_accum and os.environ.get("RANK", "0") == "0":
        log.info("resuming %s on %d data-parallel process(es): grad_accum %d -> %d keeps its global batch of %d",
                 resume.path, data_parallel, saved_accum, accum, total)
    return replace(cfg, train=replace(cfg.train, grad_accum=accum))
