"""polytrain train | launch | eval | tokenizer | model

    polytrain train configs/quickstart.yaml train.steps=50
    polytrain launch configs/quickstart.yaml launch.procs_per_node=2 [--dry-run]
    polytrain eval runs/quickstart-20261121-120000
    polytrain tokenizer train --input a.txt b.txt --vocab-size 4096 --out tok/
    polytrain model info decoder_1b
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from polytrain.errors import PolytrainError

log = logging.getLogger("polytrain")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging()
    try:
        return args.func(args) or 0
    except PolytrainError as err:
        print(f"polytrain: error: {err}", file=sys.stderr, flush=True)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polytrain", description="Train one Transformer backbone on text, "
                                     "images and audio.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train in this process (or in each process torchrun starts)")
    train.add_argument("config", help="YAML recipe, e.g. configs/quickstart.yaml")
    train.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.steps=50")
    train.set_defaults(func=cmd_train)

    launch = commands.add_parser("launch", help="start launch.procs_per_node training processes with torchrun")
    launch.add_argument("config")
    launch.add_argument("overrides", nargs="*")
    launch.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    launch.set_defaults(func=cmd_launch)

    evaluate = commands.add_parser("eval", help="reload a run's latest checkpoint and evaluate it on held-out data")
    evaluate.add_argument("run_dir", help="run directory (or one checkpoint folder)")
    evaluate.add_argument("--out", help="also write the results as JSON here")
    evaluate.set_defaults(func=cmd_eval)

    tokenizer = commands.add_parser("tokenizer", help="tokenizer tools")
    tok_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True)
    tok_train = tok_commands.add_parser("train", help="train a byte-level BPE text tokenizer")
    tok_train.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    tok_train.add_argument("--vocab-size", type=int, default=4096)
    tok_train.add_argument("--out", required=True, help="folder for tokenizer.json")
    tok_train.set_defaults(func=cmd_tokenizer_train)

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
    from polytrain.config import load_config
    from polytrain.platform.trainer import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, Path(args.config).stem)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from polytrain.config import load_config
    from polytrain.launch.local import launch

    cfg = load_config(args.config, args.overrides)
    return launch(cfg.launch, args.config, args.overrides, args.dry_run)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from polytrain.config import load_config
    from polytrain.platform import recipe
    from polytrain.platform.checkpoint import CONFIG, TOKENIZER, WEIGHTS, latest_checkpoint, load_weights
    from polytrain.platform.evaluate import evaluate, format_table

    folder = latest_checkpoint(args.run_dir)
    cfg = load_config(folder / CONFIG)
    tokenizers = recipe.build_tokenizers(cfg, folder / TOKENIZER)
    model = recipe.build_model(cfg, tokenizers)
    load_weights(model, folder / WEIGHTS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = evaluate(model.to(device), cfg.data.tasks, recipe.build_datasets(cfg, "val", tokenizers),
                       tokenizers["text"], device, cfg.train.eval_batch_size)
    print(format_table(results))
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from polytrain.errors import DataError
    from polytrain.tokenizers.text import TextTokenizer, TextTokenizerConfig

    cfg = TextTokenizerConfig(vocab_size=args.vocab_size)
    cfg.check()
    texts = []
    for name in args.input:
        try:
            texts.append(Path(name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{name}: cannot read as UTF-8 text ({err})") from None
    path = TextTokenizer.train(texts, cfg).save(args.out)
    print(path)
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from polytrain.models.presets import PRESETS, parameter_counts

    preset = PRESETS.get(args.name)
    b = preset.model.backbone
    print(f"{args.name}: {preset.about}")
    print(f"  dim {b.dim}, heads {b.n_heads} (key/value heads {b.kv_heads}), layers {b.encoder_layers} encoder + "
          f"{b.decoder_layers} decoder, mlp {b.mlp} x{b.mlp_ratio:g}, {b.norm} {b.norm_position}-norm, "
          f"positions {b.position}")
    print("  sized for: " + ", ".join(f"{s.modality} {s.input_dim} x grid {s.grid[0]}x{s.grid[1]}" for s in preset.specs))
    print("  heads: " + ", ".join(f"{task} ({head})" for task, head in preset.task_heads.items()))
    counts = parameter_counts(preset.build("meta"))
    width = max(len(part) for part in counts)
    for part, count in counts.items():
        print(f"  {part.ljust(width)}  {count:>15,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
