"""Towers end to end through the CLI: the recipes (``configs/llava_stage1.yaml``, ``llava_stage2.yaml``,
``audio_lm.yaml``, ``whisper.yaml``) fine-tuned from tiny checkpoints made with the libraries, ``polytrain export
--format hf`` reloaded in transformers with no missing or unexpected tensor, and its logits and greedy outputs
against the run's own; a whole LLaVA folder continued; the vocabulary of a text-only Llama fine-tune."""

import json

import pytest
import torch
from torch.nn import functional as F

from polytrain.cli import main
from polytrain.models.heads import text_segment
from polytrain.platform.data.builtin import resolve_manifest
from polytrain.tokens import Segment, Spans, TaskBatch
from scripts import tiny_checkpoints
from tests.helpers import REPO, polytrain, read_jsonl, trained_run
from tests.models.convert_checks import max_diff

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")

LOGITS_TOLERANCE = 1e-4
BLOCK_TENSORS = [f"{part}.{kind}" for part in ("attn_norm", "attn.qkv", "attn.out", "mlp_norm", "mlp.fc", "mlp.proj")
                 for kind in ("weight", "bias")]
"""A pre-norm ViT block's tensors, in the order its module holds them."""
STEPS = ("train.steps=4", "train.eval_every=4", "train.warmup_steps=1", "tracking.progress_bar=false")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with the recipes' tiny checkpoints (``checkpoints/``) and a shared data cache."""
    folder = tmp_path_factory.mktemp("towers")
    for name in ("clip_tiny", "llama_tiny", "whisper_tiny"):
        tiny_checkpoints.save(tiny_checkpoints.COMPOSE[name], folder / "checkpoints" / name)
    tiny_checkpoints.save(tiny_checkpoints.FAMILIES["llava"], folder / "checkpoints" / "llava")
    return folder


def finetune(workdir, recipe: str, *overrides: str):
    proc = polytrain("finetune", REPO / "configs" / f"{recipe}.yaml", *STEPS, f"data.cache_dir={workdir / 'cache'}",
                     "data.tasks.image_qa.max_val_samples=24" if "llava" in recipe else "train.seed=0", *overrides,
                     cwd=workdir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def exported(workdir, run: str, library_class):
    out = workdir / f"{run}_hf"
    assert main(["export", str(workdir / "runs" / run), "--format", "hf", "--out", str(out)]) == 0
    library, info = getattr(transformers, library_class).from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    return library.eval(), out


def digit_question(workdir, tokenizers):
    """The first validation image question of the digits: the image file, the question, and the LLaVA inputs of
    its prompt (bos, one image token per patch, the question)."""
    manifest = resolve_manifest("builtin:digits_image_qa/val", workdir / "cache")
    line = json.loads(manifest.read_text().splitlines()[0])
    image = manifest.parent / line["segments"][0]["image"]
    question = line["segments"][1]["text"]
    text, patches = tokenizers["text"], tokenizers["image"](image)
    slot = text.span_layout("image")[1]
    ids = torch.tensor([[text.bos_id, *[slot] * len(patches), *text.encode(question)]])
    return image, question, ids, tokenizers["image"].pixels(image)[None], patches


@pytest.fixture(scope="module")
def llava_runs(workdir):
    finetune(workdir, "llava_stage1")
    finetune(workdir, "llava_stage2")
    return workdir / "runs" / "llava_stage1", workdir / "runs" / "llava_stage2"


def test_llava_stage1_trains_the_projector_alone_and_stage2_continues_from_it(llava_runs):
    stage1, stage2 = llava_runs
    report = json.loads((stage1 / "init_from.json").read_text())
    assert set(report["new"]) == {f"embedders.image.projector.{p}.{k}" for p in ("fc", "proj")
                                  for k in ("weight", "bias")}
    assert report["extended"] == ["embedders.text.table.weight", "lm_head.weight"]  # one row: <image>
    _, _, first = trained_run(stage1)
    _, _, second = trained_run(stage2)
    tower = {n: t for n, t in first.state_dict().items() if ".tower." in n}
    assert tower and all(torch.equal(t, second.state_dict()[n]) for n, t in tower.items())  # frozen both times
    assert json.loads((stage2 / "init_from.json").read_text())["new"] == []  # projector from stage 1
    projector = {n: t for n, t in first.state_dict().items() if ".projector." in n}
    assert all(not torch.equal(t, second.state_dict()[n]) for n, t in projector.items())  # trained on in stage 2


def test_llava_export_gives_the_runs_logits_and_greedy_answer_in_transformers(llava_runs, workdir, capsys):
    _, stage2 = llava_runs
    library, out = exported(workdir, "llava_stage2", "LlavaForConditionalGeneration")
    config = json.loads((out / "config.json").read_text())
    kinds = (config["vision_config"]["model_type"], config["text_config"]["model_type"])
    assert kinds == ("clip_vision_model", "llama")
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-1, "default")
    cfg, tokenizers, model = trained_run(stage2)
    image, question, ids, pixels, patches = digit_question(workdir, tokenizers)
    assert config["image_token_index"] == ids[0, 1] and config["vision_config"]["num_hidden_layers"] == 1
    segment = text_segment(ids)
    segment.spans = {"image": Spans(Segment.collate([patches]), torch.tensor([0]), torch.tensor([1]))}
    with torch.no_grad():
        ours = model.eval().heads["image_qa"](model, TaskBatch(segment, ids))
        theirs = library(input_ids=ids, pixel_values=pixels).logits
    assert max_diff(ours, theirs) <= LOGITS_TOLERANCE
    capsys.readouterr()
    assert main(["generate", str(stage2), "--image", str(image), "--text", question, "max_new_tokens=4"]) == 0
    answer = capsys.readouterr().out.strip()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    generated = library.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=4, eos_token_id=tokenizers["text"].eos_id)
    assert answer == tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)


def test_a_llava_folder_is_continued_whole_and_written_back(workdir):
    """init_from a LlavaForConditionalGeneration folder: its tower, projector, LM and tokenizer (with <image>)."""
    finetune(workdir, "llava_stage1", "train.run_name=llava_whole", "finetune.init_parts={}",
             f"finetune.init_from={workdir / 'checkpoints' / 'llava'}", "finetune.freeze=[]")
    run = workdir / "runs" / "llava_whole"
    report = json.loads((run / "init_from.json").read_text())
    assert report["new"] == [] and report["extended"] == []  # its tokenizer has <image>: nothing added
    library, out = exported(workdir, "llava_whole", "LlavaForConditionalGeneration")
    cfg, tokenizers, model = trained_run(run)
    assert cfg.model.towers["image"].feature_layer == -2 and cfg.tokenizers.image.size == 16
    _, _, ids, pixels, patches = digit_question(workdir, tokenizers)
    segment = text_segment(ids)
    segment.spans = {"image": Spans(Segment.collate([patches]), torch.tensor([0]), torch.tensor([1]))}
    with torch.no_grad():
        ours = model.eval().heads["image_qa"](model, TaskBatch(segment, ids))
        assert max_diff(ours, library(input_ids=ids, pixel_values=pixels).logits) <= LOGITS_TOLERANCE


def test_a_run_with_span_markers_is_not_written_as_llava_and_says_why(workdir, llava_runs, capsys):
    finetune(workdir, "llava_stage1", "train.run_name=llava_markers", "tokenizers.text.span_markers=true")
    assert main(["export", str(workdir / "runs" / "llava_markers"), "--format", "hf", "--out", str(workdir / "x")]) == 2
    assert "LlavaForConditionalGeneration reads one image token per image feature and no markers; the run laid its " \
           "spans out between markers (set tokenizers.text.span_markers: false)" in capsys.readouterr().err


def test_whisper_fine_tuned_and_exported_transcribes_alike_in_transformers(workdir):
    """transformers' Whisper refuses clips other than 2 x max_source_positions frames, so its own encoder modules
    read each clip unpadded, as polytrain's tower does, and its ``generate`` decodes from their output."""
    finetune(workdir, "whisper")
    run = workdir / "runs" / "whisper"
    library, out = exported(workdir, "whisper", "WhisperForConditionalGeneration")
    cfg, tokenizers, model = trained_run(run)
    manifest = resolve_manifest("builtin:spoken_digits/val", workdir / "cache")
    lines = [json.loads(line) for line in manifest.read_text().splitlines()[:3]]
    encoder = library.model.encoder
    for line in lines:
        tokens = tokenizers["audio"](manifest.parent / line["audio"])
        source = Segment.collate([tokens])
        with torch.no_grad():
            mel_TM = tokens.values.view(len(tokens), -1, 2).permute(1, 0, 2).reshape(tokens.values.shape[1] // 2, -1)
            h = F.gelu(encoder.conv2(F.gelu(encoder.conv1(mel_TM[None]))))
            h = h.permute(0, 2, 1) + encoder.embed_positions.weight[: h.shape[2]]
            for layer in encoder.layers:
                h = layer(h, None)
            memory = encoder.layer_norm(h)
            assert max_diff(model.embed(source).x_BLE, memory) <= 1e-5
            start = torch.tensor([[tokenizers["text"].bos_id]])
            ours = model.heads["transcribe"].generate(model, start, source, 6, tokenizers["text"].eos_id)
            theirs = library.generate(encoder_outputs=transformers.modeling_outputs.BaseModelOutput(memory),
                                      decoder_input_ids=start, max_new_tokens=6, do_sample=False)
        theirs = theirs[0, 1:] if theirs[0, 0] == start[0, 0] else theirs[0]  # Whisper's generate drops the prompt
        assert theirs.tolist() == ours[0, :len(theirs)].tolist()
        transcript = tokenizers["text"].decode(ours[0].tolist())
        assert transcript == transformers.AutoTokenizer.from_pretrained(out).decode(theirs, skip_special_tokens=True)
    assert json.loads((out / "config.json").read_text())["decoder_start_token_id"] == tokenizers["text"].bos_id


def test_the_audio_lm_recipe_trains_a_whisper_tower_under_a_llama(workdir):
    finetune(workdir, "audio_lm")
    run = workdir / "runs" / "audio_lm"
    report = json.loads((run / "init_from.json").read_text())
    assert sum(name.startswith("embedders.audio.tower.") for name in report["loaded"]) == 31
    cfg = trained_run(run)[0]
    assert (cfg.tokenizers.audio.frontend, cfg.tokenizers.audio.n_mels, cfg.tokenizers.audio.patch_frames) == \
        ("whisper", 64, 2)
    assert all(row["loss"] == row["loss"] for row in read_jsonl(run / "metrics.jsonl") if "loss" in row)


def test_a_timm_vit_classifier_is_read_as_the_llava_recipes_image_tower(workdir):
    """A plain timm ViT classifier folder (what ``export --format timm`` writes) as stage 1's vision checkpoint: read
    as a tower of the blocks up to the recipe's feature layer (-2: the first of two), its head and the rest
    unread, its weights the tower's."""
    from dataclasses import replace

    from safetensors.torch import load_file

    vit = tiny_checkpoints.save(replace(tiny_checkpoints.COMPOSE["vit_tiny"], timm_folder=True),
                                workdir / "checkpoints" / "vit_folder")
    finetune(workdir, "llava_stage1", f"finetune.init_parts.vision.init_from={vit}", "train.run_name=vit_tower")
    run = workdir / "runs" / "vit_tower"
    cfg, _, model = trained_run(run)
    tower = cfg.model.towers["image"]
    assert (tower.dim, tower.layers, tower.built_layers, tower.cls_token, tower.final_norm) == (32, 2, 1, True, False)
    report = json.loads((run / "init_from.json").read_text())
    assert len([name for name in report["loaded"] if name.startswith("embedders.image.tower.")]) == 16
    assert [name for name in report["ignored"] if name.startswith("embedders.image.")] == \
        [f"embedders.image.tower.blocks.1.{name}" for name in BLOCK_TENSORS] + \
        ["embedders.image.tower.norm.weight", "embedders.image.tower.norm.bias"]
    timm_state, ours = load_file(str(vit / "model.safetensors")), model.state_dict()
    assert torch.equal(ours["embedders.image.tower.blocks.0.attn.qkv.weight"], timm_state["blocks.0.attn.qkv.weight"])
    assert torch.equal(ours["embedders.image.tower.stem.cls"][0], timm_state["cls_token"][0, 0])
    assert "embedders.image.tower.blocks.1.attn.qkv.weight" not in ours


def test_a_text_only_llama_fine_tune_adds_no_row_to_the_vocabulary(workdir, tmp_path):
    """Llama's tokenizer has bos, eos and an unknown token (which pads); nothing else is used, nothing is added."""
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": f"which digit is it? a seven {i}"}) + "\n"
                                                 for i in range(16)))
    task = dict(head="decoder_only", train=str(tmp_path / "text.jsonl"), val=str(tmp_path / "text.jsonl"), seq_len=16,
                batch_size=4, max_val_samples=4)
    (tmp_path / "text.yaml").write_text(json.dumps({"data": {"tasks": {"lm": task}}, "train": {
        "out_dir": str(tmp_path), "run_name": "text"}}))
    proc = polytrain("finetune", tmp_path / "text.yaml", f"init_from={workdir / 'checkpoints' / 'llama_tiny'}",
                     *STEPS, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "text" / "init_from.json").read_text())["extended"] == []
    out = tmp_path / "text_hf"
    assert main(["export", str(tmp_path / "text"), "--format", "hf", "--out", str(out)]) == 0
    vocab = json.loads((workdir / "checkpoints" / "llama_tiny" / "config.json").read_text())["vocab_size"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab
