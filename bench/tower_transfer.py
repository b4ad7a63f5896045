"""Does a pretrained, frozen tower carry what an LM needs to answer questions about digits it sees or hears?

The learning proofs of towers, on the embedded data, every run through the ``polytrain`` CLI:

1. An LM that knows the digits' words only from text: ``bench/pretrained_transfer.py``'s GPT-2-shaped LM
   (the standard library plus the digit questions asked in words), exported with ``--format hf``.
2. Towers trained on the digits: a plain ViT classifier of the digit images, exported with ``--format timm``;
   a Whisper-style audio tower (two convolutions over log-mel frames, its own blocks) in a classifier of the
   spoken digits (a polytrain run, whose ``embedders.audio`` the next runs take).
3. Per modality, LLaVA's stages on the digit questions ("Which digit is it?", "Is it even?", "What is it
   plus one?"; LLaVA's layout: one modality token per tower vector, causal): stage 1 trains the projector
   alone (tower and LM frozen) with the trained tower and with a randomly initialized frozen tower of the same
   shape; stage 2 continues from stage 1 (the trained tower's) with the projector and the LM trainable.
   Held-out exact match every ``--eval-every`` steps.
4. Whisper itself: the tiny random ``WhisperForConditionalGeneration`` of ``scripts/tiny_checkpoints.py``
   fine-tuned on the spoken digits (speech -> word), exported with ``--format hf``, and every held-out clip
   transcribed by polytrain and by transformers (its own encoder modules over the unpadded clip, its
   ``generate``): how many transcripts agree.

    python bench/tower_transfer.py [--stage1-steps 300] [--stage2-steps 200] [--out DIR] [--only image audio whisper]

A rerun with the same ``--out`` reuses the runs that finished there (each run's ``eval.json``).

Last line: one JSON object with the figures (curves, steps to targets, final exact matches, agreement).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import yaml
from pretrained_transfer import lm_recipe, write_facts
from transfer_runs import curve, first_step_reaching, polytrain

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/
from polytrain.platform.data.builtin import WORDS  # noqa: E402
from scripts import tiny_checkpoints  # noqa: E402

LM_PARTS = ["embedders.text", "backbone.decoder"]
"""What the GPT-2-shaped LM fills (its output is tied to its token table)."""
SCHEDULE = {"train": {"lr": 2.0e-3, "warmup_steps": 20}, "engine": {"zero_stage": 0},
            "tracking": {"log_every": 50, "progress_bar": False}}
"""How the towers' classifiers train."""


def classifier(source: str, data: str, batch: int) -> dict:
    """A task classifying the digits of the ``data`` built-in dataset."""
    return {"data": {"tasks": {"digit": {"head": "encoder_classifier", "source": source, "classes": list(WORDS),
                                         "train": f"builtin:{data}/train", "val": f"builtin:{data}/val",
                                         "batch_size": batch}}}, **SCHEDULE}


VIT = {
    "model": {"backbone": {"dim": 64, "n_heads": 4, "encoder_layers": 4, "decoder_layers": 0, "norm_eps": 1.0e-6},
              "embed": {"modality_vector": False, "patch_positions": "raster", "cls_token": True},
              "heads": {"classifier": {"pooling": "cls"}}},
    "tokenizers": {"text": {"vocab_size": 300}, "image": {"size": 8, "patch_size": 4, "channels": 1}},
    **classifier("image", "digits_image", 32),
}
"""A plain ViT (timm's shape: raster positions with a class token, pre-norm, eps 1e-6) classifying the digits."""
AUDIO = {"frontend": "whisper", "n_mels": 32, "patch_mels": 32, "patch_frames": 2, "max_seconds": 1.0}
AUDIO_TOWER = {
    "model": {"backbone": {"dim": 64, "n_heads": 4, "encoder_layers": 1, "decoder_layers": 0},
              "embed": {"modality_vector": False},  # as the LM it goes under has none
              "towers": {"audio": {"stem": "conv", "cls_token": False, "prefix_positions": False, "dim": 64,
                                   "layers": 4, "n_heads": 4, "norm_eps": 1.0e-5, "projector": "none"}}},
    "tokenizers": {"text": {"vocab_size": 300}, "audio": AUDIO},
    **classifier("audio", "spoken_digits", 16),
}
"""A Whisper-style audio tower (and one block, which the next runs do not take) classifying the spoken digits."""


def stage(modality: str, tower_source: dict | None, lm: Path, freeze: list[str], lr: float) -> dict:
    """A LLaVA stage on the digit questions of ``modality``; ``tower_source``: the init_parts entry of the tower
    (None: the tower as initialized, its settings then given in the recipe)."""
    data = {"image": "digits_image_qa", "audio": "spoken_digits_qa"}[modality]
    parts = {"language": {"init_from": str(lm), "parts": LM_PARTS}}
    if tower_source is not None:
        parts["tower"] = tower_source
    return {
        "model": {"backbone": {"encoder_layers": 0}, "towers": {modality: {"projector": "mlp2x_gelu"}}},
        "tokenizers": {"text": {"span_markers": False}},
        "data": {"tasks": {"qa": {"head": "decoder_only", "source": modality, "span_attention": "causal",
                                  "train": f"builtin:{data}/train", "val": f"builtin:{data}/val",
                                  "batch_size": 24, "seq_len": 64, "packing": True, "max_target_len": 4,
                                  "max_val_samples": 600}}},
        "train": {"lr": lr, "warmup_steps": 20},
        "engine": {"zero_stage": 0},
        "finetune": {"init_parts": parts, "freeze": freeze},
        "tracking": {"log_every": 20, "progress_bar": False},
    }


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run(out: Path, name: str, *args) -> None:
    """``polytrain ARGS`` for run ``name`` under ``out``, unless it finished there before (a rerun with the same
    ``--out`` picks up where a previous one stopped)."""
    if not (out / name / "eval.json").is_file():
        polytrain(*args, f"train.run_name={name}")


def stages(modality: str, tower: dict, out: Path, args, common: list[str]) -> dict[str, dict[int, float]]:
    """Stage 1 with the trained tower and with a random one, then stage 2 from the first; their curves."""
    lm = out / "lm-hf"
    frozen = [f"embedders.{modality}.tower.*", "embedders.text.*", "backbone.*"]
    trained = f"{modality}-stage1"
    schedule = [f"train.eval_every={args.eval_every}", *common]
    run(out, trained, "finetune", write(out / f"{trained}.yaml", stage(modality, tower, lm, frozen, args.stage1_lr)),
        f"train.steps={args.stage1_steps}", *schedule)
    # the same resolved model, the tower as initialized (random) and frozen
    resolved = yaml.safe_load((out / trained / "config.yaml").read_text())
    del resolved["finetune"]["init_parts"]["tower"]
    random = f"{modality}-stage1-random"
    run(out, random, "finetune", write(out / f"{random}.yaml", resolved), *schedule)
    second = f"{modality}-stage2"
    from_stage1 = {"init_from": str(out / trained), "parts": [f"embedders.{modality}"]}
    recipe = stage(modality, from_stage1, lm, [f"embedders.{modality}.tower.*"], args.stage2_lr)
    run(out, second, "finetune", write(out / f"{second}.yaml", recipe), f"train.steps={args.stage2_steps}",
        *schedule)
    return {name: curve(out / name, "qa") for name in (trained, random, second)}


def whisper_agreement(out: Path, args, common: list[str]) -> dict:
    """Whisper fine-tuned on the spoken digits and exported: polytrain's and transformers' transcripts."""
    import torch
    import transformers
    from torch.nn import functional as F

    from polytrain.job import Job
    from polytrain.platform.data.builtin import resolve_manifest
    from polytrain.tokens import Segment

    tiny_checkpoints.save(tiny_checkpoints.COMPOSE["whisper_tiny"], out / "checkpoints" / "whisper_tiny")
    recipe = Path(__file__).resolve().parent.parent / "configs" / "whisper.yaml"
    run(out, "whisper", "finetune", recipe, f"init_from={out / 'checkpoints' / 'whisper_tiny'}",
        f"train.steps={args.whisper_steps}", f"train.eval_every={args.eval_every}", *common)
    if not (out / "whisper-hf").is_dir():
        polytrain("export", out / "whisper", "--format", "hf", "--out", out / "whisper-hf")
    job = Job.of_run(out / "whisper")
    tokenizers, model = job.tokenizers, job.trained_model()
    library = transformers.WhisperForConditionalGeneration.from_pretrained(out / "whisper-hf").eval()
    encoder, text = library.model.encoder, tokenizers["text"]
    manifest = resolve_manifest("builtin:spoken_digits/val", out / "data")
    agree = right_ours = right_theirs = 0
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    for line in lines:
        tokens = tokenizers["audio"](manifest.parent / line["audio"])
        mel = tokens.values.view(len(tokens), -1, 2).permute(1, 0, 2).reshape(tokens.values.shape[1] // 2, -1)
        with torch.no_grad():
            h = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mel[None]))))
            h = h.permute(0, 2, 1) + encoder.embed_positions.weight[: h.shape[2]]
            for layer in encoder.layers:
                h = layer(h, None)
            memory = transformers.modeling_outputs.BaseModelOutput(encoder.layer_norm(h))
            start = torch.tensor([[text.bos_id]])
            ours = text.decode(model.eval().heads["transcribe"].generate(model, start, Segment.collate([tokens]), 6,
                                                                         text.eos_id)[0].tolist()).strip()
            theirs = library.generate(encoder_outputs=memory, decoder_input_ids=start, max_new_tokens=6,
                                      do_sample=False)[0]
        theirs = text.decode(theirs.tolist()).strip()
        agree += ours == theirs
        right_ours += ours == line["target"]
        right_theirs += theirs == line["target"]
    return {"clips": len(lines), "transcripts_agree": agree, "exact_match_polytrain": right_ours / len(lines),
            "exact_match_transformers": right_theirs / len(lines),
            "curve": curve(out / "whisper", "transcribe")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lm-steps", type=int, default=400)
    parser.add_argument("--tower-steps", type=int, default=400, help="steps of each tower's classifier")
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--stage2-steps", type=int, default=200)
    parser.add_argument("--stage1-lr", type=float, default=2.0e-3)
    parser.add_argument("--stage2-lr", type=float, default=1.0e-3)
    parser.add_argument("--whisper-steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--only", nargs="+", default=["image", "audio", "whisper"])
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="tower-transfer-"))
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.out_dir={out}", f"data.cache_dir={out / 'data'}"]
    figures: dict = {}
    if {"image", "audio"} & set(args.only) and not (out / "lm-hf").is_dir():
        write_facts(out / "facts.jsonl")
        lm = write(out / "lm.yaml", lm_recipe(out / "facts.jsonl", 4))
        run(out, "lm", "train", lm, f"train.steps={args.lm_steps}", *common)
        polytrain("export", out / "lm", "--format", "hf", "--out", out / "lm-hf")
    curves = {}
    if "image" in args.only:
        run(out, "vit", "train", write(out / "vit.yaml", VIT), f"train.steps={args.tower_steps}", *common)
        if not (out / "vit-timm").is_dir():
            polytrain("export", out / "vit", "--format", "timm", "--out", out / "vit-timm")
        figures["image_tower_accuracy"] = json.loads((out / "vit" / "eval.json").read_text())["digit"]["accuracy"]
        curves.update(stages("image", {"init_from": str(out / "vit-timm"), "parts": ["embedders.image"]}, out, args,
                             common))
    if "audio" in args.only:
        recipe = write(out / "audio_tower.yaml", AUDIO_TOWER)
        run(out, "audio_tower", "train", recipe, f"train.steps={args.tower_steps}", *common)
        figures["audio_tower_accuracy"] = json.loads((out / "audio_tower" / "eval.json").read_text())["digit"][
            "accuracy"]
        curves.update(stages("audio", {"init_from": str(out / "audio_tower"), "parts": ["embedders.audio"]}, out, args,
                             common))
    for name, points in curves.items():
        print(f"{name:22s} " + "  ".join(f"{step}:{value:.3f}" for step, value in sorted(points.items())))
        figures[name] = {"curve": points, "final_exact_match": points[max(points)],
                         "steps_to_target": {str(t): first_step_reaching(points, t) for t in args.targets}}
    if "whisper" in args.only:
        figures["whisper"] = whisper_agreement(out, args, common)
        print(f"whisper: {figures['whisper']['transcripts_agree']} of {figures['whisper']['clips']} held-out "
              f"transcripts agree; exact match {figures['whisper']['exact_match_polytrain']:.3f}")
    print(f"runs: {out}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
