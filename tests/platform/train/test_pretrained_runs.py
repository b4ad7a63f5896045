"""Every checkpoint family end to end through the CLI: a tiny checkpoint made with the real library,
``polytrain finetune`` from it on a manifest, ``polytrain export --format hf|timm``, the export reloaded in the
library with no missing or unexpected tensor, and its logits (and greedy continuations) against the run's own;
and every command that reads the recipe or the run (plan, doctor, data prepare, finetune, eval, export) seeing
the same model and tokenizer."""

import hashlib
import json

import pytest
import torch
import yaml
from PIL import Image

from polytrain.cli import main
from polytrain.models.heads import text_segment
from polytrain.tokenizers.image import patchify
from polytrain.tokens import Segment, TaskBatch
from scripts import tiny_checkpoints
from tests.helpers import job_seen, logged, polytrain, trained_run
from tests.models.convert_checks import TOLERANCE, max_diff

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

TEXT = [f"the quick brown fox {i} jumps over the lazy dog, which digit is it? a seven" for i in range(24)]
CAUSAL = dict(head="decoder_only", seq_len=16, lines=[{"text": t} for t in TEXT])
TASKS = {
    "gpt2": CAUSAL, "llama": CAUSAL, "qwen2": CAUSAL, "mistral": CAUSAL,
    "bert_mlm": dict(head="masked_lm", seq_len=16, lines=[{"text": t} for t in TEXT]),
    "bert_cls": dict(head="encoder_classifier", seq_len=16, classes=["neg", "pos"],
                     lines=[{"text": t, "label": ["neg", "pos"][i % 2]} for i, t in enumerate(TEXT)]),
    "bart": dict(head="encoder_decoder", seq_len=16, max_target_len=6,
                 lines=[{"text": t, "target": f"seven {i}"} for i, t in enumerate(TEXT)]),
    "vit": dict(head="encoder_classifier", source="image", classes=["a", "b", "c"],
                lines=[{"image": f"{i}.png", "label": "abc"[i % 3]} for i in range(12)]),
}
"""The task each family's run trains (and the manifest lines it reads)."""
AUTO = {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM", "qwen2": "AutoModelForCausalLM",
        "mistral": "AutoModelForCausalLM", "bert_mlm": "AutoModelForMaskedLM",
        "bert_cls": "AutoModelForSequenceClassification", "bart": "AutoModelForSeq2SeqLM"}
ADDED = {"gpt2": ["<pad>"], "qwen2": ["<bos>"]}
"""The special tokens a run adds to each checkpoint's vocabulary: GPT-2's one token serves as bos and eos, so
padding needs its own; Qwen2's names no bos. The others have all a run uses (Llama's unknown token pads)."""
ZERO_STAGE = {"bart": 2}
"""Most runs keep whole weights (stage 0); BART's export merges ZeRO-2 shards from their fp32 masters."""


def recipe(family: str, folder) -> dict:
    task = {k: v for k, v in TASKS[family].items() if k != "lines"}
    with open(folder / "data.jsonl", "w") as f:
        for line in TASKS[family]["lines"]:
            f.write(json.dumps(line) + "\n")
            if "image" in line:
                pixels = torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(len(line)))
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(folder / line["image"])
    task.update(train=str(folder / "data.jsonl"), val=str(folder / "data.jsonl"), batch_size=4, max_val_samples=4)
    return {"data": {"tasks": {"task": task}, "cache_dir": str(folder / "cache")},
            "train": {"steps": 3, "lr": 3.0e-3, "warmup_steps": 1, "eval_batch_size": 4, "out_dir": str(folder),
                      "run_name": "run"},
            "engine": {"zero_stage": ZERO_STAGE.get(family, 0)}, "tracking": {"log_every": 1, "progress_bar": False}}


@pytest.fixture(scope="module")
def run(request, tmp_path_factory):
    """One family's checkpoint, the run fine-tuned from it through the CLI, and its export reloaded."""
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    checkpoint = tiny_checkpoints.save(tiny_checkpoints.FAMILIES[family], folder / "checkpoint")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe(family, folder)))
    args = dict(tiny_checkpoints.FAMILIES[family].config)
    extra = [f"finetune.timm_model={args.pop('model_name')}", f"finetune.timm_args={json.dumps(args)}"
             ] if family == "vit" else []
    recipe_args = [str(folder / "recipe.yaml"), f"finetune.init_from={checkpoint}", *extra]
    seen = {}
    with logged() as lines:  # the commands that read the recipe, before the run
        for command in (["plan", *recipe_args], ["doctor", *recipe_args],
                        ["data", "prepare", *recipe_args, "--out", str(folder / "prepared")]):
            assert main(command) in (0, 1), command  # doctor exits 1 when a launcher tool is missing
            seen[command[0]], lines[:] = job_seen("\n".join(lines)), []
    proc = polytrain("finetune", folder / "recipe.yaml", f"init_from={checkpoint}", *extra, cwd=folder)
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen["finetune"] = job_seen(proc.stderr)
    fmt = "timm" if family == "vit" else "hf"
    with logged() as lines:  # and those that read the run
        assert main(["export", str(folder / "run"), "--format", fmt, "--out", str(folder / "exported")]) == 0
        seen["export"], lines[:] = job_seen("\n".join(lines)), []
        assert main(["eval", str(folder / "run")]) == 0
        seen["eval"] = job_seen("\n".join(lines))
    if family == "vit":
        library = timm.create_model(f"local-dir:{folder / 'exported'}", pretrained=True)
    else:
        library, info = getattr(transformers, AUTO[family]).from_pretrained(folder / "exported",
                                                                            output_loading_info=True)
        assert not any(info.values()), info
    cfg, tokenizers, model = trained_run(folder / "run")
    return family, checkpoint, folder / "run", model.eval(), library.eval(), tokenizers["text"], seen


def logits(family: str, model, library, vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(polytrain's, the library's, where to compare) on a batch with a padded row."""
    g = torch.Generator().manual_seed(0)
    if family == "vit":
        pixels = torch.randn(2, 3, 16, 16, generator=g)
        patches = Segment.collate([patchify(p, 8) for p in pixels])
        ours = model.heads["task"](model, TaskBatch(patches, torch.zeros(2, dtype=torch.long)))
        return ours, library(pixels), None
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    inputs = text_segment(ids)
    inputs.mask[1, 8:] = False
    if family == "bart":
        target_ids = torch.randint(0, vocab, (2, 6), generator=g)
        ours = model.heads["task"](model, TaskBatch(text_segment(target_ids), target_ids, inputs))
        theirs = library(input_ids=ids, attention_mask=inputs.mask.long(), decoder_input_ids=target_ids).logits
        return ours, theirs, None
    ours = model.heads["task"](model, TaskBatch(inputs, ids))
    theirs = library(ids, attention_mask=inputs.mask.long()).logits
    return ours, theirs, None if family == "bert_cls" else inputs.mask


@pytest.mark.parametrize("run", list(TASKS), indirect=True)
def test_the_export_gives_the_runs_logits_in_the_library(run):
    family, checkpoint, _, model, library, _, _ = run
    vocab = 0 if family == "vit" else json.loads((checkpoint / "config.json").read_text())["vocab_size"]
    with torch.no_grad():
        ours, theirs, where = logits(family, model, library, vocab)
    assert max_diff(ours, theirs, where) <= TOLERANCE


@pytest.mark.parametrize("run", [family for family, task in TASKS.items() if task is CAUSAL], indirect=True)
def test_causal_lms_continue_greedily_alike(run, capsys):
    """``polytrain generate`` on the run, and the library's own generate and tokenizer on the export."""
    family, _, run_dir, _, library, text, _ = run
    capsys.readouterr()
    assert main(["generate", str(run_dir), "--text", "the quick brown fox", "max_new_tokens=8"]) == 0
    ours = capsys.readouterr().out.strip()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir.parent / "exported")
    prompt = torch.tensor([[tokenizer.bos_token_id, *tokenizer("the quick brown fox").input_ids]])  # as polytrain's
    assert prompt[0, 0] == text.bos_id and prompt[0, 1:].tolist() == text.encode("the quick brown fox")
    theirs = library.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8)
    assert ours == tokenizer.decode(theirs[0, prompt.shape[1]:], skip_special_tokens=True)
    assert len(theirs[0]) > len(prompt[0]) + 1


@pytest.mark.parametrize("run", list(TASKS), indirect=True)
def test_the_run_config_holds_the_derived_architecture_and_the_report_every_tensor(run):
    family, checkpoint, run_dir, model, _, text, _ = run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    library = tiny_checkpoints.FAMILIES[family].config
    width = library.get("embed_dim") or library.get("n_embd") or library.get("hidden_size") or library["d_model"]
    assert saved["model"]["backbone"]["dim"] == width
    report = json.loads((run_dir / "init_from.json").read_text())
    assert report["sources"][0]["family"] == ("timm" if family == "vit" else tiny_checkpoints.FAMILIES[family].library)
    unread = {name for name in model.state_dict() if name.startswith("embedders.text.")} if family == "vit" else set()
    assert set(report["new"]) == unread and set(report["loaded"]) == set(model.state_dict()) - unread
    if family != "vit":  # the checkpoint's tokenizer, with the special tokens the run uses and it lacks after its ids
        assert text.hf.token_to_id(tiny_checkpoints.FAMILIES[family].special["unk"]) is not None
        vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
        assert [text.hf.id_to_token(i) for i in range(vocab, text.vocab_size)] == ADDED.get(family, [])
        assert all(extended.startswith(f"rows {vocab}..") for extended in report["sources"][0]["extended"].values())


@pytest.mark.parametrize("run", list(TASKS), indirect=True)
def test_every_command_sees_the_model_and_tokenizer_the_run_trains(run):
    """One resolution: plan, doctor and data prepare (the recipe), finetune, and export and eval (the run) count the
    same parameters (trainable ones too) and the same text tokenizer, whichever family the weights come from."""
    *_, text, seen = run
    assert len(set(seen.values())) == 1, seen
    assert seen["finetune"][2] == hashlib.sha256(text.hf.to_str().encode()).hexdigest()
