"""What a run's checkpoints decide, checked where the job starts and before any training: the architecture and
tokenizer settings their configs give, and the one-line errors (exit 2) of everything that contradicts them."""

import pickle

import pytest
import torch

from polytrain.cli import main
from polytrain.errors import DataError
from polytrain.job import resolve
from polytrain.models.model import PolyModel
from polytrain.platform.train.init_from import load_initial_weights
from polytrain.platform.train.sources import offers, open_sources
from polytrain.tokens import EmbedSpec
from scripts import tiny_checkpoints


def job_cfg(path, overrides):
    """The job's config: the recipe completed from its checkpoints."""
    return resolve(path, overrides).cfg


TASK = ["data.tasks.t.head=decoder_only", "data.tasks.t.train=x.jsonl", "data.tasks.t.val=x.jsonl",
        "data.tasks.t.seq_len=16"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    made = {name: tiny_checkpoints.save(tiny_checkpoints.FAMILIES[name], root / name) for name in ("gpt2", "bert_cls")}
    made.update({name: tiny_checkpoints.save(family, root / name) for name, family in tiny_checkpoints.COMPOSE.items()})
    return made


def vit_source(checkpoints, name="vision", parts="[embedders.image, backbone.encoder]") -> list[str]:
    args = {k: v for k, v in tiny_checkpoints.COMPOSE["vit_tiny"].config.items() if k != "model_name"}
    return [f"finetune.init_parts.{name}.init_from={checkpoints['vit_tiny']}",
            f"finetune.init_parts.{name}.timm_model=vit_tiny_patch16_224",
            f"finetune.init_parts.{name}.timm_args={args}".replace("'", ""), f"finetune.init_parts.{name}.parts={parts}"]


def test_a_checkpoints_config_gives_the_model_and_the_tokenizer_settings(checkpoints):
    cfg = job_cfg(None, TASK + [f"finetune.init_from={checkpoints['gpt2']}", "model.backbone.dropout=0.1"])
    b = cfg.model.backbone
    assert (b.dim, b.n_heads, b.encoder_layers, b.decoder_layers, b.mlp, b.mlp_hidden) == (32, 4, 0, 2, "gelu_tanh", 128)
    assert b.dropout == 0.1  # the recipe keeps what the checkpoint does not say
    assert not cfg.model.embed.modality_vector and cfg.model.tie_embeddings
    text = cfg.tokenizers.text
    assert (text.bos, text.eos, text.pad, text.max_len) == ("<|endoftext|>", "<|endoftext|>", "<pad>", 64)


def test_bert_names_its_special_tokens_and_a_classifier_task_takes_its_head(checkpoints):
    cfg = job_cfg(None, ["data.tasks.t.head=encoder_classifier", "data.tasks.t.classes=[neg, pos]",
                         "data.tasks.t.train=x", "data.tasks.t.val=x", f"finetune.init_from={checkpoints['bert_cls']}"])
    text, classifier = cfg.tokenizers.text, cfg.model.heads.classifier
    assert (text.bos, text.eos, text.pad, text.mask) == ("[CLS]", "[SEP]", "[PAD]", "[MASK]")
    assert (cfg.model.backbone.norm_position, classifier.pooling, classifier.pooler) == ("post", "cls", True)
    (source,) = open_sources(cfg.finetune)
    assert source.filled({"t": "encoder_classifier"}) == ["embedders.text", "backbone.encoder", "heads.t"]


def test_two_checkpoints_compose_an_encoder_of_its_own_width(checkpoints):
    cfg = job_cfg(None, ["data.tasks.t.head=encoder_decoder", "data.tasks.t.source=image", "data.tasks.t.train=x",
                         "data.tasks.t.val=x", *vit_source(checkpoints),
                         f"finetune.init_parts.language.init_from={checkpoints['llama_tiny']}",
                         "finetune.init_parts.language.parts=[embedders.text, backbone.decoder]"])
    b = cfg.model.backbone
    assert (b.dim, b.norm, b.position, b.encoder_stack.dim, b.encoder_stack.norm, b.encoder_stack.position) == \
        (48, "rmsnorm", "rope", 32, "layernorm", "learned")
    image = cfg.tokenizers.image
    assert (image.patch_size, image.size, image.channels) == (4, 8, 1)
    assert not cfg.model.tie_embeddings  # the Llama's, though its lm_head is not taken: it starts new


@pytest.fixture
def recipe(tmp_path):
    """A one-task LM recipe; its manifests are never read (every error here comes first)."""
    path = tmp_path / "lm.yaml"
    path.write_text("data:\n  tasks:\n    t: {head: decoder_only, train: x.jsonl, val: x.jsonl, seq_len: 16}\n")
    return path


def one_line_error(capsys, *argv) -> str:
    """``polytrain ARGV``'s error, checked to be one line with exit code 2."""
    code = main([str(arg) for arg in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("polytrain: error: "), (code, err)
    return err


@pytest.mark.parametrize("override, message", [
    ("model.backbone.dim=64", "model.backbone.dim=64: contradicts finetune.init_from ({gpt2}), a GPT2LMHeadModel "
                              "checkpoint whose config gives 32"),
    ("model.backbone.n_kv_heads=2", "model.backbone.n_kv_heads=2: contradicts finetune.init_from"),
    ("model.backbone.mlp_width=64", "model.backbone.mlp_width=64: contradicts"),
    ("model.embed.modality_vector=true", "model.embed.modality_vector=True: contradicts"),
    ("tokenizers.text.max_len=32", "tokenizers.text.max_len=32: contradicts finetune.init_from ({gpt2}), a "
                                   "GPT2LMHeadModel checkpoint of 64 positions (a learned table of them)"),
    ("tokenizers.text.path=tok.json", "tokenizers.text.path='tok.json': the text embedder comes from"),
])
def test_a_recipe_key_that_contradicts_the_checkpoint_is_one_line_naming_both_values(checkpoints, recipe, override,
                                                                                       message, capsys):
    err = one_line_error(capsys, "finetune", recipe, f"init_from={checkpoints['gpt2']}", override)
    assert message.format(gpt2=checkpoints["gpt2"]) in err


def test_equivalent_spellings_and_runtime_keys_are_no_contradiction(checkpoints):
    cfg = job_cfg(None, TASK + [f"finetune.init_from={checkpoints['gpt2']}", "model.backbone.n_kv_heads=0",
                                   "model.backbone.mlp_ratio=2.0", "model.backbone.attention=sdpa_math",
                                   "tokenizers.text.pad=<|pad|>"])
    assert cfg.model.backbone.mlp_hidden == 128 and cfg.tokenizers.text.pad == "<|pad|>"  # a name is the recipe's


@pytest.mark.parametrize("overrides, message", [
    (lambda c: vit_source(c, parts="[backbone.encoder, backbone.decoder]"),
     "finetune.init_parts.vision.parts.1: {vit_tiny} (timm) has no backbone.decoder; it has embedders.image, "
     "backbone.encoder, a head"),
    (lambda c: [f"finetune.init_from={c['vit_tiny']}"],
     "finetune.init_from='{vit_tiny}': {vit_tiny}: not a polytrain export (no polytrain_config in its metadata); "
     "write one with polytrain export RUN_DIR --out FILE, or name the timm model of a timm file (timm_model)"),
    (lambda c: [f"finetune.init_from={c['vit_tiny']}", "finetune.timm_model=vit_huge_patch14_eva_224"],
     "finetune.init_from='{vit_tiny}': timm model 'vit_huge_patch14_eva_224' is not a ViT polytrain can express"),
    (lambda c: [f"finetune.init_from={c['llama_tiny']}/missing"],
     "finetune.init_from='{llama_tiny}/missing': no such file or directory on this machine"),
])
def test_a_checkpoint_that_cannot_serve_is_one_line_naming_the_key(checkpoints, recipe, overrides, message, capsys):
    err = one_line_error(capsys, "finetune", recipe, *overrides(checkpoints))
    assert message.format(**checkpoints) in err


def test_pickled_weights_are_refused_unopened(checkpoints, recipe, tmp_path, capsys):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoints["llama_tiny"] / "config.json").read_text())
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump({"never": "opened"}, f)
    err = one_line_error(capsys, "finetune", recipe, f"init_from={folder}")
    assert f"finetune.init_from='{folder}': {folder}/pytorch_model.bin: pickled weights, which polytrain never " \
           "loads" in err


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(checkpoints):
    cfg = job_cfg(None, ["data.tasks.t.head=encoder_classifier", "data.tasks.t.classes=[a, b, c]",
                         "data.tasks.t.train=x", "data.tasks.t.val=x", f"finetune.init_from={checkpoints['bert_cls']}"])
    sources = open_sources(cfg.finetune)
    model = PolyModel(cfg.model, [EmbedSpec("text", 200, (1, 64))], {"t": "encoder_classifier"}, {"t": 3})
    with pytest.raises(DataError, match=r"heads\.t\.proj\.weight: finetune\.init_from \(.*bert_cls\) has \(2, 32\), "
                                        r"the model \(3, 32\)"):
        load_initial_weights(model, offers(sources, set(model.state_dict()), {"t": "encoder_classifier"}))


def test_vocabulary_rows_grow_for_the_tokens_polytrain_adds(checkpoints):
    cfg = job_cfg(None, TASK + [f"finetune.init_from={checkpoints['gpt2']}"])
    sources = open_sources(cfg.finetune)
    model = PolyModel(cfg.model, [EmbedSpec("text", 327, (1, 64))], {"t": "decoder_only"})
    before = model.embedders["text"].table.weight[320:].clone()
    report = load_initial_weights(model, offers(sources, set(model.state_dict()), {"t": "decoder_only"}))
    table = sources[0].external.state["transformer.wte.weight"]
    assert torch.equal(model.embedders["text"].table.weight[:320], table)
    assert torch.equal(model.embedders["text"].table.weight[320:], before)  # as initialized
    assert report.sources[0].extended == {"embedders.text.table.weight": "rows 320..326 new (the tokens the run's "
                                                                      "tokenizer added)"}


def test_composed_parts_compute_what_their_libraries_do(checkpoints, tmp_path):
    """The ViT's features come out of the encoder, and with the new cross-attention silenced the Llama's logits
    out of the decoder (the vocabulary rows the run added aside)."""
    import timm
    import transformers
    from safetensors.torch import load_file

    from polytrain.models.heads import text_segment
    from polytrain.tokenizers.image import patchify
    from polytrain.tokens import Segment, TaskBatch
    from tests.models.convert_checks import TOLERANCE, max_diff

    job = resolve(None, ["data.tasks.t.head=encoder_decoder", "data.tasks.t.source=image", "data.tasks.t.train=x",
                         "data.tasks.t.val=x", *vit_source(checkpoints),
                         f"finetune.init_parts.language.init_from={checkpoints['llama_tiny']}",
                         "finetune.init_parts.language.parts=[embedders.text, backbone.decoder, lm_head]"])
    model = job.build_model()[0].eval()
    load_initial_weights(model, offers(job.sources, set(model.state_dict()), {"t": "encoder_decoder"}))
    args = {k: v for k, v in tiny_checkpoints.COMPOSE["vit_tiny"].config.items() if k != "model_name"}
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args).eval()
    vit.load_state_dict(load_file(str(checkpoints["vit_tiny"])))
    llama = transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama_tiny"]).eval()
    pixels = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    images = Segment.collate([patchify(p, 4) for p in pixels])
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(model.backbone.encode(model.embed(images)), vit.forward_features(pixels)) <= TOLERANCE
        for block in model.backbone.decoder.blocks:
            block.cross.out.weight.zero_()
        logits = model.heads["t"](model, TaskBatch(text_segment(ids), ids, images))
        assert max_diff(logits[..., :320], llama(ids).logits) <= TOLERANCE
