"""polytrain train | finetune | launch | doctor | generate | eval | export | report | plan | tokenizer | data | model

    polytrain train configs/quickstart.yaml train.steps=50
    polytrain finetune configs/finetune_audio.yaml init_from=runs/pretrain finetune.lora.rank=8
    polytrain launch configs/quickstart.yaml launch.procs_per_node=2 [--dry-run]
    polytrain launch configs/multinode.yaml launch.slurm.partition=gpu --submit
    polytrain doctor configs/quickstart.yaml engine.offload_optimizer=true
    polytrain generate runs/vlm-20261121-120000 --image seven.png --text "Is it even?" strategy=beam
    polytrain eval runs/quickstart-20261121-120000
    polytrain export runs/quickstart-20261121-120000 --out model.safetensors
    polytrain report runs/quickstart-20261121-120000 [--out DIR]
    polytrain plan configs/quickstart.yaml --gpus-per-node 8 --nodes 2 --gpu-mem 80GB
    polytrain tokenizer train --modality text --input a.txt b.txt --vocab-size 4096 --out tok/
    polytrain data prepare configs/quickstart.yaml --out build/prepared/quickstart
    polytrain model info decoder_1b
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from polytrain import atomic
from polytrain.errors import STOPPED, PolytrainError, Stopped
from polytrain.launch.failures import record_failure

log = logging.getLogger("polytrain")


def main(argv: list[str] | None = None) -> int:
    args = parse(build_parser(), sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        return args.func(args) or 0
    except Stopped as err:  # a checkpoint to resume from is written: not an error, a distinct exit code
        say(f"polytrain: {one_line(str(err))}")
        record_failure(err)
        return STOPPED
    except PolytrainError as err:
        say(f"polytrain: error: {one_line(str(err))}")
        record_failure(err)
        if process_group_alive():
            # Interpreter teardown with a live gloo/NCCL group can abort the process (SIGABRT from a
            # communication thread) instead of exiting 2; the error is reported, so leave at once.
            sys.stdout.flush()
            os._exit(2)
        return 2
    except Exception as err:
        record_failure(err)  # a process of a launched job: its launcher reports the error in one line
        raise


def say(line: str) -> None:
    """``line`` to stderr in one write: the lines of a job's processes, which share the stream, never interleave."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def one_line(message: str) -> str:
    """``message`` with its control characters escaped: a path or value holding a line break stays on the line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def process_group_alive() -> bool:
    """Whether this process joined a torch.distributed process group (looked up without importing torch)."""
    distributed = sys.modules.get("torch.distributed")
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


class Segments(argparse.Action):
    """Collects ``--image a.png --text "which digit?"`` as (modality, value) pairs, in command-line order."""

    def __call__(self, parser, namespace, value, option_string=None):
        modality = option_string.lstrip("-")
        if modality == "segment":
            modality, sep, value = value.partition("=")
            if not sep or not modality or not value:
                parser.error(f"--segment {value!r}: give MODALITY=PATH, e.g. --segment motion=walk.npy")
        namespace.segments = [*(namespace.segments or []), (modality, value)]


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The command line, with a command's flags allowed anywhere among its ``key=value`` overrides
    (``polytrain launch CONFIG --dry-run a.b=c``, ``polytrain data prepare CONFIG --out DIR a.b=c``): the
    command that has no subcommands of its own is parsed by its own parser, intermixed."""
    names, current = argparse.Namespace(), parser
    for depth, word in enumerate(argv):
        commands = next(a for a in current._actions if isinstance(a, argparse._SubParsersAction))
        command = commands.choices.get(word)
        if command is None:
            break
        setattr(names, commands.dest, word)
        if command._subparsers is None:
            return command.parse_intermixed_args(argv[depth + 1:], names)
        current = command
    return parser.parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polytrain", description="Train one Transformer backbone on text, "
                                     "images and audio.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train in this process (or in each process torchrun starts)")
    train.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=50")
    train.set_defaults(func=cmd_train)

    finetune = commands.add_parser("finetune", help="train starting from pretrained weights: "
                                   "polytrain finetune CONFIG init_from=RUN_DIR_OR_SAFETENSORS [overrides]")
    finetune.add_argument("config", help="YAML recipe of the fine-tuning tasks")
    finetune.add_argument("overrides", nargs="*", help="init_from=PATH (short for finetune.init_from=PATH) and "
                          "section.key=value, e.g. finetune.freeze=[backbone.*] finetune.lora.rank=8")
    finetune.set_defaults(func=cmd_finetune)

    launch = commands.add_parser("launch", help="start a job on launch.nodes x launch.procs_per_node processes "
                                 "with launch.backend: torchrun, deepspeed or slurm")
    launch.add_argument("config", help="YAML recipe, e.g. configs/multinode.yaml")
    launch.add_argument("overrides", nargs="*", help="section.key=value, e.g. launch.nodes=2 launch.procs_per_node=8")
    launch.add_argument("--dry-run", action="store_true", help="print the exact command(s) or SLURM script each "
                        "node would run; start nothing")
    launch.add_argument("--submit", action="store_true", help="launch.backend=slurm: submit the written script "
                        "with sbatch")
    launch.set_defaults(func=cmd_launch)

    doctor = commands.add_parser("doctor", help="print versions and GPUs; check that the DeepSpeed ops and "
                                 "launcher tools a config needs are there")
    doctor.add_argument("config", nargs="?", help="recipe to check for (default: the default engine and launch "
                        "settings)")
    doctor.add_argument("overrides", nargs="*")
    doctor.set_defaults(func=cmd_doctor)

    generate = commands.add_parser("generate", help="continue new inputs with a trained run: --image/--audio/--text "
                                   "in order as one sample's segments, or the samples of a manifest")
    generate.add_argument("run_dir", help="run directory (or one checkpoint folder, or an exported file)")
    generate.add_argument("overrides", nargs="*", help="decoding settings as key=value (strategy=beam num_beams=4, "
                          "temperature=0.7, top_k, top_p, length_penalty) and max_new_tokens=N")
    for modality in ("image", "audio", "text"):
        generate.add_argument(f"--{modality}", dest="segments", action=Segments, metavar="TEXT" if modality == "text"
                              else "PATH", help=f"a {modality} segment of the sample (repeatable; in order)")
    generate.add_argument("--segment", dest="segments", action=Segments, metavar="MODALITY=PATH",
                          help="a segment of a plugin modality")
    generate.add_argument("--manifest", help="a JSONL manifest: continue each of its samples (scored segments are "
                          "references, printed beside the continuation)")
    generate.add_argument("--task", help="the run's task whose head generates (needed when it has several)")
    generate.set_defaults(func=cmd_generate)

    evaluate = commands.add_parser("eval", help="reload a run's latest checkpoint and evaluate it on held-out data")
    evaluate.add_argument("run_dir", help="run directory (or one checkpoint folder)")
    evaluate.add_argument("--out", help="also write the results as JSON here")
    evaluate.set_defaults(func=cmd_eval)

    export = commands.add_parser("export", help="consolidate a run's latest checkpoint (ZeRO shards included) "
                                 "into one safetensors file plus its config, or a Hugging Face or timm checkpoint")
    export.add_argument("run_dir", help="run directory (or one checkpoint folder)")
    export.add_argument("--format", default="polytrain", choices=("polytrain", "hf", "timm"),
                        help="polytrain: one .safetensors file with the config and tokenizer in its metadata; hf: a "
                        "save_pretrained folder transformers' Auto classes load; timm: a folder (and weights file) "
                        "timm.create_model loads")
    export.add_argument("--out", required=True, help="polytrain: the .safetensors file to write (the config goes "
                        "beside it as .yaml); hf, timm: the folder to write")
    export.set_defaults(func=cmd_export)

    report = commands.add_parser("report", help="draw a run's loss, learning-rate and eval curves to report.png "
                                 "and a report.html page with them and a summary")
    report.add_argument("run_dir", help="run directory (the one holding metrics.jsonl)")
    report.add_argument("--out", help="folder for report.png and report.html (default: the run directory)")
    report.set_defaults(func=cmd_report)

    plan = commands.add_parser("plan", help="estimate per-rank memory under each ZeRO stage and offload choice "
                               "and recommend the least sharding that fits")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpu-mem", default="80GB", help="memory of one GPU, e.g. 80GB, 40GiB")
    plan.set_defaults(func=cmd_plan)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tok_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tok_commands.add_parser("train", help="train a byte-level BPE text tokenizer")
    tok_train.add_argument("--modality", default="text",
                           help="modality whose tokenizer to train; only text tokenizers learn from data")
    tok_train.add_argument("--input", nargs="+", required=True, help="UTF-8 text files, one document each")
    tok_train.add_argument("--vocab-size", type=int, default=4096,
                           help="tokens in the vocabulary, the 256 bytes and the special tokens included")
    tok_train.add_argument("--min-frequency", type=int, default=2, help="occurrences a pair needs to be merged")
    tok_train.add_argument("--out", required=True, help="folder for tokenizer.json")
    tok_train.set_defaults(func=cmd_tokenizer_train)

    data = commands.add_parser("data", help="data tools")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser("prepare", help="tokenize a recipe's data once into prepared shards: "
                                       "polytrain data prepare CONFIG --out DIR [overrides]")
    prepare.add_argument("config", help="YAML recipe whose tasks' train and val data to prepare")
    prepare.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.skip_bad_samples=true")
    prepare.add_argument("--out", required=True, help="folder of the prepared data: <task>/<split>/ per split")
    prepare.add_argument("--workers", type=int, default=0, help="processes that build shards (0: one per CPU)")
    prepare.add_argument("--shard-records", type=int, help="input records per shard (default 1000)")
    prepare.set_defaults(func=cmd_data_prepare)

    model = commands.add_parser("model", help="model presets")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    model_info = model_commands.add_parser("info", help="a preset's shape and parameter counts")
    model_info.add_argument("name", help="preset name, e.g. tiny, base, decoder_1b, vit_tiny_patch16_224")
    model_info.set_defaults(func=cmd_model_info)
    return parser


def setup_logging() -> None:
    main_process = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "accelerate", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    from polytrain.job import resolve
    from polytrain.platform.train.trainer import train

    train(resolve(args.config, args.overrides, *training_processes()))
    return 0


def training_processes() -> tuple[int, str]:
    """The processes of this training job: torchrun's (or the launcher's) WORLD_SIZE, else this one alone; and
    where that count comes from (``resolve``'s ``counted``)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return processes, f"WORLD_SIZE={processes}" if "WORLD_SIZE" in os.environ else "one process, no WORLD_SIZE"


def cmd_finetune(args: argparse.Namespace) -> int:
    from polytrain.errors import ConfigError
    from polytrain.job import resolve
    from polytrain.platform.train.trainer import train

    job = resolve(args.config, finetune_overrides(args.overrides), *training_processes())
    if not job.cfg.finetune.init_from and not job.cfg.finetune.init_parts:
        raise ConfigError("finetune.init_from", None, "polytrain finetune needs the weights to start from: "
                          "init_from=RUN_DIR, a checkpoint folder, an exported .safetensors file, a Hugging Face or "
                          "timm folder (or finetune.init_parts)")
    train(job)
    return 0


def finetune_overrides(overrides: list[str]) -> list[str]:
    """``init_from=PATH`` (the finetune command's short form) as ``finetune.init_from=PATH``."""
    return [f"finetune.{item}" if item.startswith("init_from=") else item for item in overrides]


def cmd_launch(args: argparse.Namespace) -> int:
    from polytrain.job import resolve
    from polytrain.launch.backends import launch

    job = resolve(args.config, args.overrides)
    if not args.dry_run:
        load_torch_quietly()
    return launch(job, args.config, args.overrides, args.dry_run, args.submit)


def load_torch_quietly() -> None:
    """Import torch with its C++ log level at FATAL.

    torch's C++ layer logs each failed rendezvous connection attempt with a stack trace; the launcher
    reports a failed rendezvous itself, in one line. The level is read when torch loads, so it is set for
    that moment only: the processes the launcher starts get the user's setting back.
    """
    if "TORCH_CPP_LOG_LEVEL" in os.environ or "torch" in sys.modules:
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    try:
        import torch  # noqa: F401  (loaded for its log level; the launcher uses it next)
    finally:
        del os.environ["TORCH_CPP_LOG_LEVEL"]


def cmd_doctor(args: argparse.Namespace) -> int:
    from polytrain.launch.doctor import doctor

    return doctor(args.config, args.overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    from polytrain.job import Job
    from polytrain.platform.train.generate import generate_command

    job = Job.of_run(args.run_dir)
    log.info("%s", job.summary())
    return generate_command(job, args.run_dir, args.segments or [], args.manifest, args.task, args.overrides)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from polytrain.job import Job
    from polytrain.platform.data.datasets import build_datasets
    from polytrain.platform.train.evaluate import evaluate, format_table

    job = Job.of_run(args.run_dir)
    cfg, tokenizers = job.cfg, job.tokenizers
    log.info("%s", job.summary())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    held_out = build_datasets(cfg, "val", tokenizers, job.manifests)
    results = evaluate(job.trained_model().to(device), cfg.data.tasks, held_out, tokenizers["text"], device,
                       cfg.train.eval_batch_size, cfg.model.heads.decoding)
    print(format_table(results))
    print(json.dumps(results))
    if args.out:
        atomic.write_text(Path(args.out), json.dumps(results, indent=1) + "\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from polytrain.job import Job
    from polytrain.platform.train.export import export_library, export_model

    job = Job.of_run(args.run_dir)
    log.info("%s", job.summary())
    if args.format != "polytrain":
        family, task, left_out = export_library(job, args.run_dir, args.format, Path(args.out))
        print(f"{args.out} ({family}, the head of task {task}; left out, as the task does not run them: "
              f"{', '.join(left_out) or '-'})")
        return 0
    out = export_model(args.run_dir, Path(args.out))
    print(f"{out} (config: {out.with_suffix('.yaml')})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from polytrain.platform.observe.report import write_report

    png, page = write_report(Path(args.run_dir), None if args.out is None else Path(args.out))
    print(png)
    print(page)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from polytrain.job import resolve
    from polytrain.platform.distributed.memory_planner import format_plan, parse_size, plan

    job = resolve(args.config, finetune_overrides(args.overrides), args.gpus_per_node * args.nodes,
                  f"--gpus-per-node {args.gpus_per_node} x --nodes {args.nodes}")
    gpu_mem = parse_size(args.gpu_mem)
    rows, best = plan(job.cfg, args.gpus_per_node, args.nodes, gpu_mem, job.parameter_counts, job.grids())
    log.info("%s", job.summary())
    print(format_plan(job.cfg, rows, best, args.gpus_per_node, args.nodes, gpu_mem, job.parameter_counts(),
                      job.grids()))
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from polytrain.config.registries import TOKENIZERS
    from polytrain.config.tokenizers import TextTokenizerConfig
    from polytrain.errors import ConfigError, DataError
    from polytrain.schema import from_dict
    from polytrain.tokenizers.text import TextTokenizer

    if TOKENIZERS.get(args.modality) is not TextTokenizer:
        raise ConfigError("--modality", args.modality, "only text tokenizers are trained; the others have no "
                          "learned state and are set up by the recipe's tokenizers section")
    try:
        cfg = from_dict(TextTokenizerConfig, {"vocab_size": args.vocab_size, "min_frequency": args.min_frequency})
    except ConfigError as err:
        raise ConfigError(f"--{err.key.replace('_', '-')}", err.value, err.allowed) from None
    missing = [name for name in args.input if not Path(name).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: no such file")

    def documents():
        for name in args.input:
            try:
                yield Path(name).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise DataError(f"{name}: cannot read as UTF-8 text ({err})") from None

    path = TextTokenizer.train(documents(), cfg).save(args.out)
    print(path)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from polytrain.errors import ConfigError
    from polytrain.job import resolve
    from polytrain.platform.data.prepare import SHARD_RECORDS, prepare_tasks

    shard_records = SHARD_RECORDS if args.shard_records is None else args.shard_records
    if args.workers < 0:
        raise ConfigError("--workers", args.workers, "must be >= 0 (0: one per CPU)")
    if shard_records < 1:
        raise ConfigError("--shard-records", shard_records, "must be >= 1")
    job = resolve(args.config, finetune_overrides(args.overrides))
    log.info("%s", job.summary())
    overrides = prepare_tasks(job.cfg, job.manifests, job.tokenizers["text"], Path(args.out), args.workers,
                              shard_records)
    command = "finetune" if job.cfg.finetune.init_from or job.cfg.finetune.init_parts else "train"
    print(f"train on it with: polytrain {command} " + " ".join([args.config, *args.overrides, *overrides]))
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from polytrain.config.registries import PRESETS
    from polytrain.models.presets import build, parameter_counts

    preset = PRESETS.get(args.name)
    b = preset.model.backbone
    print(f"{args.name}: {preset.about}")
    print(f"  dim {b.dim}, heads {b.n_heads} (key/value heads {b.kv_heads}), layers {b.encoder_layers} encoder + "
          f"{b.decoder_layers} decoder, mlp {b.mlp} x{b.mlp_ratio:g}, {b.norm} {b.norm_position}-norm, "
          f"positions {b.position}")
    sized = (f"{s.modality} {s.input_dim} x grid {s.grid[0]}x{s.grid[1]}" for s in preset.specs)
    print("  sized for: " + ", ".join(sized))
    print("  heads: " + ", ".join(f"{task} ({head})" for task, head in preset.task_heads.items()))
    counts = parameter_counts(build(preset, "meta"))
    width = max(len(part) for part in counts)
    for part, count in counts.items():
        print(f"  {part.ljust(width)}  {count:>15,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
