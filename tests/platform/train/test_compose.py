"""configs/compose.yaml through the CLI: a timm ViT's image embedder and encoder and a Llama's text embedder,
decoder and output in one encoder-decoder, the glue new, the vision frozen; what init_from.json and config.yaml
say of it; and the export that no single library class can take."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from polytrain.cli import main
from scripts import tiny_checkpoints
from tests.helpers import REPO, job_seen, logged, polytrain, trained_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def composed(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("compose")
    vit = tiny_checkpoints.save(tiny_checkpoints.COMPOSE["vit_tiny"], root / "vit_tiny")
    llama = tiny_checkpoints.save(tiny_checkpoints.COMPOSE["llama_tiny"], root / "llama_tiny")
    proc = polytrain("finetune", REPO / "configs" / "compose.yaml", f"finetune.init_parts.vision.init_from={vit}",
                     f"finetune.init_parts.language.init_from={llama}", "train.steps=3", "train.eval_every=0",
                     "data.tasks.image_to_text.max_val_samples=16", f"train.out_dir={root}", "train.run_name=run",
                     f"data.cache_dir={data_cache}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (root / "run" / "stderr.log").write_text(proc.stderr)
    return root / "run", vit, llama


def test_each_checkpoint_fills_its_parts_and_the_glue_is_new(composed):
    run, vit, llama = composed
    report = json.loads((run / "init_from.json").read_text())
    vision, language = report["sources"]
    assert (vision["family"], vision["parts"]) == ("timm", ["embedders.image", "backbone.encoder"])
    assert (language["family"], language["parts"]) == ("LlamaForCausalLM", ["embedders.text", "backbone.decoder",
                                                                            "lm_head"])
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in vision["loaded"]} == {"embedders.image", "backbone.encoder"}
    assert vision["ignored"] == ["heads.source.proj.weight", "heads.source.proj.bias"]  # the ViT's own classifier
    glue = {n for n in report["new"] if ".lora_" not in n}
    assert glue == {"backbone.memory_proj.weight", "backbone.memory_proj.bias"} | {
        f"backbone.decoder.blocks.{i}.{name}.weight" for i in range(2) for name in ("cross_norm", "cross.q", "cross.kv",
                                                                                   "cross.out")}
    assert language["extended"] == {}  # Llama's tokenizer has every token the run uses (its unknown token pads)


def test_the_run_config_holds_both_checkpoints_blocks(composed):
    run, _, _ = composed
    backbone = yaml.safe_load((run / "config.yaml").read_text())["model"]["backbone"]
    assert (backbone["dim"], backbone["norm"], backbone["mlp"], backbone["position"]) == (48, "rmsnorm", "swiglu", "rope")
    assert backbone["encoder"] == {"dim": 32, "n_heads": 2, "mlp_width": 128, "mlp": "gelu", "norm": "layernorm",
                                   "qkv_bias": True, "out_bias": True, "mlp_bias": True, "position": "learned"}


def test_frozen_vision_keeps_the_vits_weights_and_lora_leaves_the_lms(composed):
    run, vit, llama = composed
    _, _, model = trained_run(run)  # LoRA folded in
    trained = load_file(str(run / "checkpoints" / "step_00000003" / "model.safetensors"))
    timm_state, hf_state = load_file(str(vit)), load_file(str(llama / "model.safetensors"))
    assert torch.equal(trained["embedders.image.proj.weight"], timm_state["patch_embed.proj.weight"].flatten(1))
    assert torch.equal(trained["backbone.encoder.blocks.1.mlp.fc.weight"], timm_state["blocks.1.mlp.fc1.weight"])
    qkv = torch.cat([hf_state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(trained["backbone.decoder.blocks.0.attn.qkv.weight"], qkv)  # the base LoRA adapts
    assert not torch.equal(model.state_dict()["backbone.decoder.blocks.0.attn.qkv.weight"], qkv)  # adapted


def test_exporting_the_composition_names_what_no_library_class_holds(composed, capsys):
    run, _, _ = composed
    assert main(["export", str(run), "--format", "hf", "--out", str(run.parent / "hf")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bar, reading the checkpoint
    assert last.startswith("polytrain: error: polytrain export --format hf: BartForConditionalGeneration cannot "
                           "express embedders.image.")
    assert not (run.parent / "hf").exists()


def test_plan_and_prepare_see_the_run_and_its_prepared_data_trains(composed, data_cache, capsys):
    """The issue-20 reproduction: plan sizes the model the finetune run trains, the run logs its LoRA and freezing
    once, and data prepare writes shards with the Llama's tokenizer that the printed finetune command trains on."""
    run, vit, llama = composed
    stderr = (run / "stderr.log").read_text()
    assert stderr.count("LoRA rank 8 on 8 linear layers") == 1 and stderr.count("froze ") == 1
    sources = [f"finetune.init_parts.vision.init_from={vit}", f"finetune.init_parts.language.init_from={llama}",
               f"data.cache_dir={data_cache}"]
    recipe = str(REPO / "configs" / "compose.yaml")
    with logged() as lines:
        assert main(["plan", recipe, *sources, "--gpus-per-node", "8", "--nodes", "1", "--gpu-mem", "80GB"]) == 0
        assert job_seen("\n".join(lines)) == job_seen(stderr)
        capsys.readouterr()
        assert main(["data", "prepare", recipe, *sources, "--out", str(run.parent / "prepared")]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.startswith(f"train on it with: polytrain finetune {recipe} ")
    command = printed.removeprefix("train on it with: polytrain ").split()
    proc = polytrain(*command, "train.steps=1", "data.tasks.image_to_text.max_val_samples=4",
                     f"train.out_dir={run.parent}", "train.run_name=prepared", cwd=run.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert job_seen(proc.stderr) == job_seen(stderr)
