"""Does a decoder that starts from a trained Hugging Face language model learn the digit questions faster than
from scratch?

1. Trains a GPT-2-shaped text LM (``model.preset: gpt2``, shrunk) and exports it with ``polytrain export
   --format hf``: a real, trained checkpoint in Hugging Face's format.  Its corpus is Python's standard library
   plus the digits' questions asked in words (``seven`` / ``Is it even?`` / ``no``, ``seven`` / ``What is it
   plus one?`` / ``eight``): what the LM knows of digits, it knows from text.
2. Trains the LLaVA-style task -- a digit image, then a question about it, the answer scored -- twice with the
   same steps, data and evaluation schedule: ``polytrain finetune ... init_from=THAT_FOLDER`` (architecture,
   tokenizer, text embedder and decoder from the checkpoint; the image embedder and markers new), and from
   scratch (the same resolved config and tokenizer, every weight initialized).

The LM has never seen an image: what it brings is what a digit word implies (parity, successor), which the
image arm must otherwise learn from the images' answers alone.  Prints both arms' held-out exact match side by
side and the first evaluated step each reaches each target.

    python bench/pretrained_transfer.py [--lm-steps 400] [--steps 300] [--targets 0.8 0.85 0.9] [--out DIR]

Last line: one JSON object with the figures.
"""

import argparse
import json
import tempfile
from pathlib import Path

import yaml
from transfer_runs import curve, first_step_reaching, polytrain

from polytrain.platform.data.builtin import QUESTIONS, WORDS
from polytrain.platform.observe.report import load_run

TASK = "image_qa"


def lm_recipe(facts: Path, layers: int) -> dict:
    """GPT-2's blocks at 128 wide on the standard library and the digit facts (``facts``, a manifest)."""
    return {
        "model": {"preset": "gpt2", "backbone": {"dim": 128, "n_heads": 4, "decoder_layers": layers}},
        "tokenizers": {"text": {"vocab_size": 512, "max_len": 64}},
        "data": {"tasks": {
            "text_lm": {"head": "decoder_only", "train": "builtin:stdlib/train", "val": "builtin:stdlib/val",
                        "batch_size": 16, "seq_len": 64, "max_val_samples": 64},
            "facts": {"head": "decoder_only", "train": str(facts), "val": str(facts), "batch_size": 16,
                      "seq_len": 32, "packing": True}}},
        "train": {"lr": 2.0e-3, "warmup_steps": 40},
        "engine": {"zero_stage": 0},
        "tracking": {"log_every": 20, "progress_bar": False},
    }


QA = {
    "tokenizers": {"image": {"size": 8, "patch_size": 4, "channels": 1}},
    "data": {"tasks": {TASK: {"head": "decoder_only", "source": "image", "train": "builtin:digits_image_qa/train",
                              "val": "builtin:digits_image_qa/val", "batch_size": 24, "seq_len": 64,
                              "packing": True, "max_target_len": 4, "max_val_samples": 600}}},
    "train": {"lr": 1.0e-3, "warmup_steps": 20},
    "engine": {"zero_stage": 0},
    "tracking": {"log_every": 20, "progress_bar": False},
}
"""The digit questions (``configs/vlm.yaml``'s image task); the model section comes from the checkpoint."""


def write_facts(path: Path) -> None:
    """The QA datasets' questions asked of each digit's word instead of its image, every part scored."""
    with path.open("w") as out:
        for d, word in enumerate(WORDS):
            for q, (question, answer) in enumerate(QUESTIONS):
                parts = [{"text": word, "scored": True}, {"text": question, "scored": True},
                         {"text": answer(d), "scored": True}]
                out.write(json.dumps({"segments": parts, "id": f"{word}/q{q}"}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm-steps", type=int, default=400)
    parser.add_argument("--lm-layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300, help="steps of each digit run")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.85, 0.9],
                        help="held-out exact matches to reach")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="pretrained-transfer-"))
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.out_dir={out}", f"data.cache_dir={out / 'data'}"]
    write_facts(out / "facts.jsonl")
    for name, recipe in (("lm", lm_recipe(out / "facts.jsonl", args.lm_layers)), ("qa", QA)):
        (out / f"{name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    polytrain("train", out / "lm.yaml", f"train.steps={args.lm_steps}", "train.run_name=lm", *common)
    polytrain("export", out / "lm", "--format", "hf", "--out", out / "lm-hf")
    qa = [f"train.steps={args.steps}", f"train.eval_every={args.eval_every}", *common]
    polytrain("finetune", out / "qa.yaml", f"init_from={out / 'lm-hf'}", "train.run_name=pretrained", *qa)
    # the same resolved config and tokenizer, every weight as initialized
    polytrain("train", out / "pretrained" / "config.yaml", "finetune.init_from=null", "train.run_name=scratch",
              f"tokenizers.text.path={out / 'pretrained' / 'tokenizer' / 'tokenizer.json'}", *qa)
    curves = {arm: curve(out / arm, TASK) for arm in ("pretrained", "scratch")}
    print(f"{'step':>5}  {'pretrained':>10}  {'scratch':>8}   (held-out exact match, {TASK})")
    for step in sorted(curves["pretrained"]):
        print(f"{step:5d}  {curves['pretrained'][step]:10.3f}  {curves['scratch'].get(step, float('nan')):8.3f}")
    lm = load_run(out / "lm")
    figures = {"steps": args.steps, "lm_steps": args.lm_steps,
               "lm_val_loss": {task: lm.series(f"eval/{task}/val_loss")[1][-1] for task in ("text_lm", "facts")}}
    for arm, points in curves.items():
        figures[f"{arm}/steps_to_target"] = {str(t): first_step_reaching(points, t) for t in args.targets}
        figures[f"{arm}/final_exact_match"] = points[max(points)]
        figures[f"{arm}/curve"] = points
    for target in map(str, args.targets):
        print(f"exact match {target}: pretrained at step {figures['pretrained/steps_to_target'][target]}, scratch "
              f"at {figures['scratch/steps_to_target'][target]}")
    print(f"runs: {out}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
