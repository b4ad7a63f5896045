"""A new modality as a plugin, and the claim fine-tuning rests on: a pretrained backbone learns new modalities
in fewer steps than the same model from scratch.

The example plugin (examples/new_modality) is installed editable and offline into an environment layered
on the project's (the project's environment itself is left as it was). A backbone pretrained on digit images
and stdlib text is then fine-tuned on two modalities it never saw, spoken digits (audio) and the plugin's
air-written digits felt by a wrist accelerometer (motion), with the backbone frozen but for LoRA adapters; the same model trains
from scratch on the same data for the same steps. Both are evaluated on held-out speakers and subjects.
"""

import json
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

from polytrain.config.registries import TOKENIZERS
from polytrain.errors import DataError
from polytrain.platform.observe.report import load_run
from tests.helpers import REPO, polytrain

pytestmark = pytest.mark.slow

EXAMPLE = REPO / "examples" / "new_modality"
MODEL = ["model.backbone.dim=64", "model.backbone.n_heads=4", "model.backbone.encoder_layers=2",
         "model.backbone.decoder_layers=2", "tokenizers.text.vocab_size=512", "tokenizers.text.max_len=32"]
STEPS, EVAL_EVERY, TARGET = 50, 10, 0.3
RECIPE = f"""
model:
  backbone: {{dim: 64, n_heads: 4, encoder_layers: 2, decoder_layers: 2, mlp_ratio: 4.0}}
tokenizers:
  text: {{vocab_size: 512, max_len: 32}}
  audio: {{n_mels: 64, patch_mels: 16, patch_frames: 8, max_seconds: 2.0}}
  plugins:
    motion: {{axes: 3, sample_rate: 50, patch_samples: 10, max_seconds: 3.0}}
data:
  tasks:
    audio_to_text: {{head: encoder_decoder, source: audio, train: "builtin:spoken_digits/train",
                    val: "builtin:spoken_digits/val", batch_size: 16}}
    motion_to_text: {{head: encoder_decoder, source: motion, train: "builtin:air_digits/train",
                     val: "builtin:air_digits/val", batch_size: 16}}
train: {{steps: {STEPS}, lr: 3.0e-3, warmup_steps: 5, eval_every: {EVAL_EVERY}, eval_batch_size: 64}}
finetune:
  freeze: ["backbone.*"]
  lr_scale: {{"embedders.audio.*": 5.0, "embedders.motion.*": 5.0}}
  lora: {{rank: 8, alpha: 16.0, targets: ["*.attn.*", "*.cross.*", "*.mlp.*"]}}
tracking: {{log_every: 10, progress_bar: false}}
"""
"""Both new modalities at once, fine-tuned with the backbone frozen but for LoRA adapters."""
SCRATCH = ["finetune.freeze=[]", "finetune.lora.rank=0", "finetune.lr_scale={}"]


@pytest.fixture(scope="module")
def plugin_python(tmp_path_factory):
    """The interpreter of a fresh environment that sees the project's packages plus the editable example."""
    env = tmp_path_factory.mktemp("plugin-env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    site = subprocess.run([env / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    base = sysconfig.get_paths()["purelib"]
    (env / site / "_project_env.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    install = subprocess.run([env / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                              "--no-index", "--quiet", "-e", EXAMPLE], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    return env / "bin" / "python"


def train(python, *args, cwd):
    proc = polytrain(*args, cwd=cwd, python=python)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(plugin_python, tmp_path_factory, data_cache):
    """The pretrained backbone, then the fine-tuned and the from-scratch runs on both new modalities."""
    root = tmp_path_factory.mktemp("transfer")
    common = [f"data.cache_dir={data_cache}", f"train.out_dir={root}", "tracking.progress_bar=false"]
    train(plugin_python, "train", REPO / "configs" / "pretrain.yaml", *MODEL, "train.steps=150",
              "train.warmup_steps=10", "data.tasks.text_lm.seq_len=32", "data.tasks.text_lm.batch_size=4",
              "train.run_name=pretrain", *common, cwd=root)
    recipe = root / "new_modalities.yaml"
    recipe.write_text(RECIPE)
    finetuned = train(plugin_python, "finetune", recipe, f"init_from={root / 'pretrain'}", "train.run_name=finetuned",
                          *common, cwd=root)
    train(plugin_python, "train", recipe, *SCRATCH, "train.run_name=scratch", *common, cwd=root)
    return root, finetuned.stderr


def exact_match(run_dir, task) -> dict[int, float]:
    return dict(zip(*load_run(run_dir).series(f"eval/{task}/exact_match")))


def steps_to(points: dict[int, float], target: float) -> float:
    return next((step for step, value in sorted(points.items()) if value >= target), float("inf"))


def test_the_plugin_adds_a_modality_only_where_it_is_installed(plugin_python):
    listing = "from polytrain.config.registries import BUILTINS, EMBEDDERS, TOKENIZERS; " \
              "print(TOKENIZERS.names(), EMBEDDERS.names(), 'air_digits' in BUILTINS)"
    done = subprocess.run([plugin_python, "-c", listing], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['audio', 'image', 'motion', 'text'] ['audio', 'image', 'motion', 'text'] True"
    assert "motion" not in TOKENIZERS  # the project's own environment is untouched


@pytest.mark.parametrize("task", ["audio_to_text", "motion_to_text"])
def test_finetuned_backbone_reaches_the_target_in_fewer_steps_than_scratch(runs, task):
    root, _ = runs
    tuned, scratch = exact_match(root / "finetuned", task), exact_match(root / "scratch", task)
    assert sorted(tuned) == sorted(scratch) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert steps_to(tuned, TARGET) < steps_to(scratch, TARGET), f"fine-tuned {tuned}, from scratch {scratch}"


def test_finetune_reports_what_it_loaded_and_trains_only_adapters_and_new_parts(runs):
    root, stderr = runs
    report = json.loads((root / "finetuned" / "init_from.json").read_text())
    [source] = report["sources"]
    assert source["source"] == f"finetune.init_from ({root / 'pretrain'})"
    assert report["extended"] == []  # both tasks read their clips in the encoder: no span markers, no new rows
    assert sorted(report["ignored"]) == ["embedders.image.modality", "embedders.image.position.col.weight",
                                         "embedders.image.position.row.weight", "embedders.image.proj.bias",
                                         "embedders.image.proj.weight"]
    new = [name for name in report["new"] if ".lora_" not in name]
    assert {name.split(".")[1] for name in new} == {"audio", "motion"}
    assert "init_from " in stderr and "loaded 71 tensors" in stderr


def load_example_module(monkeypatch, **settings):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from polytrain_motion.tokenizer import MotionTokenizer, MotionTokenizerConfig

    return MotionTokenizer(MotionTokenizerConfig(**settings))


@pytest.mark.parametrize("remove_gravity", [False, True])
def test_motion_tokenizer_patches_equal_a_hand_cut(monkeypatch, tmp_path, remove_gravity):
    tokenizer = load_example_module(monkeypatch, remove_gravity=remove_gravity)
    recording = np.arange(23 * 3, dtype=np.float32).reshape(23, 3) + np.array([0, 0, 9.81], dtype=np.float32)
    np.save(tmp_path / "r.npy", recording)
    np.savetxt(tmp_path / "r.csv", recording, delimiter=",")
    tokens = tokenizer(tmp_path / "r.npy")
    assert tokens.values.shape == (2, 30) and tokens.positions.tolist() == [[0, 0], [0, 1]]  # the 3-step tail dropped
    want = recording - recording.mean(axis=0) if remove_gravity else recording  # the mean of all 23 steps
    assert np.allclose(tokens.values[1].numpy(), want[10:20].reshape(-1) / 9.81, atol=1e-6)
    assert np.allclose(tokenizer(tmp_path / "r.csv").values.numpy(), tokens.values.numpy(), atol=1e-6)


@pytest.mark.parametrize("content, fragment", [
    (np.zeros((20, 2)), r"a recording must be \(time steps, 3 axes\), got shape \(20, 2\)"),
    (np.full((20, 3), np.nan), "recording contains NaN or infinite values"),
    (np.zeros((5, 3)), "5 time steps, fewer than one patch"),
])
def test_bad_recordings_name_the_file(monkeypatch, tmp_path, content, fragment):
    tokenizer = load_example_module(monkeypatch)
    np.save(tmp_path / "bad.npy", content)
    with pytest.raises(DataError, match=rf"bad\.npy: {fragment}"):
        tokenizer(tmp_path / "bad.npy")
    (tmp_path / "bad.wav").write_bytes(b"RIFF")
    with pytest.raises(DataError, match=r"bad\.wav: unknown recording format '\.wav'"):
        tokenizer(tmp_path / "bad.wav")
