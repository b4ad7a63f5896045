"""Does a pretrained backbone learn a new modality faster than training from scratch?

Pretrains ``configs/pretrain.yaml`` (digit images -> word, stdlib LM), then trains each new-modality
task three ways with the same steps, data and evaluation schedule: fine-tuned with the backbone
frozen, fine-tuned with a frozen backbone plus LoRA adapters (the recipes' setting), and from
scratch. Reports, per arm, the first evaluated step whose held-out exact match reaches the target,
and the accuracy at the end; ``polytrain report`` draws each run's curves.

The new modalities: spoken digits (audio, shipped) and, when the example plugin
``examples/new_modality`` is installed in this environment, digits written in the air as a wrist
accelerometer felt them (motion).

    python bench/finetune_transfer.py [--pretrain-steps 300] [--steps 200] [--target 0.8] [--out DIR]

Last line: one JSON object with the figures.
"""

import argparse
import json
import tempfile
from pathlib import Path

from transfer_runs import curve, first_step_reaching, polytrain

REPO = Path(__file__).resolve().parent.parent
TASKS = {"audio_to_text": REPO / "configs" / "finetune_audio.yaml",
         "motion_to_text": REPO / "examples" / "new_modality" / "configs" / "finetune_motion.yaml"}
ARMS = {
    "frozen": ["finetune.lora.rank=0"],
    "lora": [],
    "scratch": ["finetune.freeze=[]", "finetune.lora.rank=0", "finetune.lr_scale={}"],
}
"""Overrides of each task recipe (which fine-tunes with a frozen backbone plus LoRA)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=200, help="steps of every new-modality run")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.8, help="held-out exact match to reach")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="transfer-"))
    from polytrain.config.registries import TOKENIZERS

    tasks = {task: recipe for task, recipe in TASKS.items() if task != "motion_to_text" or "motion" in TOKENIZERS}
    if len(tasks) < len(TASKS):
        print("motion skipped: install the example plugin first (pip install -e examples/new_modality)")
    common = [f"train.out_dir={out}", "tracking.progress_bar=false"]
    polytrain("train", REPO / "configs" / "pretrain.yaml", f"train.steps={args.pretrain_steps}",
              "train.run_name=pretrain", *common)
    figures = {"target_exact_match": args.target, "steps": args.steps, "pretrain_steps": args.pretrain_steps}
    for task, recipe in tasks.items():
        for arm, overrides in ARMS.items():
            name = f"{task}-{arm}"
            start = [] if arm == "scratch" else [f"finetune.init_from={out / 'pretrain'}"]
            polytrain("train", recipe, *overrides, *start, f"train.steps={args.steps}",
                      f"train.eval_every={args.eval_every}", f"train.run_name={name}", *common)
            polytrain("report", out / name)
            points = curve(out / name, task)
            reached = first_step_reaching(points, args.target)
            figures[f"{task}/{arm}/steps_to_target"] = reached
            figures[f"{task}/{arm}/final_exact_match"] = points[max(points)]
            print(f"{task:15s} {arm:8s} reaches {args.target:.2f} at step {reached}; final {points[max(points)]:.3f} "
                  f"({out / name})", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
