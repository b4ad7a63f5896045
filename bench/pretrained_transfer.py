"""Does a decoder that starts from a trained Hugging Face language model learn the digit tasks faster than from scratch?

1. Trains a GPT-2-shaped text LM (``model.preset: gpt2``, shrunk) on the embedded stdlib corpus and exports it
   with ``polytrain export --format hf``: a real, trained checkpoint in Hugging Face's format.
2. Trains digit images -> word twice with the same steps, data and evaluation schedule: ``polytrain finetune
   ... init_from=THAT_FOLDER`` (its architecture, tokenizer, text embedder and decoder from the checkpoint; the
   image embedder, encoder and cross-attention new), and from scratch (the same resolved config and tokenizer,
   every weight initialized).

Prints both arms' held-out exact match side by side and the first evaluated step each reaches the target.

    python bench/pretrained_transfer.py [--lm-steps 400] [--steps 200] [--target 0.8] [--out DIR]

Last line: one JSON object with the figures.
"""

import argparse
import json
import tempfile
from pathlib import Path

import yaml

from polytrain.platform.observe.report import load_run
from transfer_runs import curve, first_step_reaching, polytrain

LM = {
    "model": {"preset": "gpt2", "backbone": {"dim": 128, "n_heads": 4, "decoder_layers": 2}},
    "tokenizers": {"text": {"vocab_size": 1024, "max_len": 64}},
    "data": {"tasks": {"text_lm": {"head": "decoder_only", "train": "builtin:stdlib/train", "val": "builtin:stdlib/val",
                                   "batch_size": 16, "seq_len": 64, "max_val_samples": 128}}},
    "train": {"lr": 2.0e-3, "warmup_steps": 40},
    "engine": {"zero_stage": 0},
    "tracking": {"log_every": 20, "progress_bar": False},
}
"""The language model: GPT-2's blocks at 128 wide, 2 layers, on Python's standard library."""
DIGITS = {
    "model": {"backbone": {"encoder_layers": 2}},
    "tokenizers": {"image": {"size": 8, "patch_size": 4, "channels": 1}},
    "data": {"tasks": {"image_to_text": {"head": "encoder_decoder", "source": "image",
                                         "train": "builtin:digits_image/train", "val": "builtin:digits_image/val",
                                         "batch_size": 32, "max_val_samples": 128}}},
    "train": {"lr": 1.0e-3, "warmup_steps": 10},
    "engine": {"zero_stage": 0},
    "tracking": {"log_every": 20, "progress_bar": False},
}
"""The digit task; the model section beyond the new encoder's depth comes from the checkpoint."""
TASK = "image_to_text"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm-steps", type=int, default=400)
    parser.add_argument("--steps", type=int, default=200, help="steps of each digit run")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.8, help="held-out exact match to reach")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="pretrained-transfer-"))
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.out_dir={out}", f"data.cache_dir={out / 'data'}"]
    for name, recipe in (("lm", LM), ("digits", DIGITS)):
        (out / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    polytrain("train", out / "lm.yaml", f"train.steps={args.lm_steps}", "train.run_name=lm", *common)
    polytrain("export", out / "lm", "--format", "hf", "--out", out / "lm-hf")
    digits = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", *common]
    polytrain("finetune", out / "digits.yaml", f"init_from={out / 'lm-hf'}", "train.run_name=pretrained", *digits)
    # the same resolved config and tokenizer, every weight as initialized
    polytrain("train", out / "pretrained" / "config.yaml", "finetune.init_from=null", "train.run_name=scratch",
              f"tokenizers.text.path={out / 'pretrained' / 'tokenizer' / 'tokenizer.json'}", *digits)
    curves = {arm: curve(out / arm, TASK) for arm in ("pretrained", "scratch")}
    print(f"{'step':>5}  {'pretrained':>10}  {'scratch':>8}   (held-out exact match, {TASK})")
    for step in sorted(curves["pretrained"]):
        print(f"{step:5d}  {curves['pretrained'][step]:10.3f}  {curves['scratch'].get(step, float('nan')):8.3f}")
    figures = {"target_exact_match": args.target, "steps": args.steps, "lm_steps": args.lm_steps,
               "lm_val_loss": load_run(out / "lm").series("eval/text_lm/val_loss")[1][-1]}
    for arm, points in curves.items():
        figures[f"{arm}/steps_to_target"] = first_step_reaching(points, args.target)
        figures[f"{arm}/final_exact_match"] = points[max(points)]
        figures[f"{arm}/curve"] = points
    print(f"pretrained reaches {args.target:.2f} at step {figures['pretrained/steps_to_target']}, scratch at "
          f"{figures['scratch/steps_to_target']} ({out})")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
