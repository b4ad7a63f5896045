"""Registries: loud lookups, and plugins from the entry points of a tiny package made in the test."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from polytrain.errors import PolytrainError
from polytrain.registry import Registry
from tests.helpers import REPO

PLUGIN = '''
from dataclasses import dataclass

import torch

from polytrain.errors import ConfigError
from polytrain.tokens import EmbedSpec, Tokens


@dataclass(frozen=True)
class ScalarConfig:
    bins: int = 4
    """Values per token."""

    def check(self):
        if self.bins < 1:
            raise ConfigError("bins", self.bins, "must be >= 1")


class ScalarTokenizer:
    """A new modality: a list of numbers, cut into tokens of ``bins`` values."""

    modality = "scalar"
    config_class = ScalarConfig

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, numbers):
        values = torch.tensor(numbers, dtype=torch.float32).reshape(-1, self.cfg.bins)
        cols = torch.arange(len(values))
        return Tokens(values, torch.stack([torch.zeros_like(cols), cols], 1), "scalar")

    def embed_spec(self):
        return EmbedSpec("scalar", self.cfg.bins, (1, 64))
'''


@pytest.fixture
def plugin_site(tmp_path):
    """A folder laid out like site-packages with one installed distribution, ``scalarplug`` 0.1."""
    site = tmp_path / "site"
    (site / "scalarplug").mkdir(parents=True)
    (site / "scalarplug" / "__init__.py").write_text(PLUGIN)
    info = site / "scalarplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scalarplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [polytrain.tokenizers]
        scalar = scalarplug:ScalarTokenizer
        broken = scalarplug.missing:Thing
        text = scalarplug:ScalarTokenizer
        """))
    return site


def test_unknown_name_lists_the_known_ones():
    reg = Registry("modality")
    reg.register("text")(str)
    reg.register("audio")(int)
    with pytest.raises(PolytrainError, match=r"unknown modality 'vidoe'; known: audio, text"):
        reg.get("vidoe")


def test_registering_a_name_twice_is_refused():
    reg = Registry("head")
    reg.register("a")(str)
    with pytest.raises(PolytrainError, match="head 'a' is already registered"):
        reg.register("a")(int)


def test_entry_point_plugins_join_lazily_and_fail_by_name(plugin_site, monkeypatch, caplog):
    monkeypatch.syspath_prepend(str(plugin_site))
    reg = Registry("modality", group="polytrain.tokenizers")
    reg.register("text")(str)
    with caplog.at_level(logging.WARNING, logger="polytrain.registry"):
        assert reg.names() == ["broken", "scalar", "text"]
    assert "scalarplug" not in sys.modules  # listed, not imported
    assert "ignoring entry point 'text = scalarplug:ScalarTokenizer' (group polytrain.tokenizers) of package " \
           "scalarplug 0.1: modality 'text' is already registered" in caplog.text
    assert reg.get("text") is str  # the built-in keeps its name
    tokenizer_class = reg.get("scalar")
    assert tokenizer_class.__module__ == "scalarplug" and "scalar" in reg
    tokens = tokenizer_class(tokenizer_class.config_class(bins=2))([1.0, 2.0, 3.0, 4.0])
    assert tokens.values.tolist() == [[1.0, 2.0], [3.0, 4.0]] and tokens.positions[:, 1].tolist() == [0, 1]
    with pytest.raises(PolytrainError, match=r"modality 'broken' comes from entry point 'broken = "
                                             r"scalarplug.missing:Thing' \(group polytrain.tokenizers\) of package "
                                             r"scalarplug 0.1, which failed to load: ModuleNotFoundError"):
        reg.get("broken")
    with pytest.raises(PolytrainError, match="unknown modality 'vidoe'; known: broken, scalar, text"):
        reg.get("vidoe")


PROBE = """
import json, sys
from polytrain.config import load_config
from polytrain.errors import ConfigError
from polytrain.tokenizers.build import build_patch_tokenizer
from polytrain.config.registries import TOKENIZERS

base = ["data.tasks.t.head=encoder_decoder", "data.tasks.t.source=scalar", "data.tasks.t.train=m.jsonl",
        "data.tasks.t.val=m.jsonl"]
cfg = load_config(None, base + ["tokenizers.plugins.scalar.bins=3"])
tokenizer = build_patch_tokenizer("scalar", cfg.tokenizers)
errors = []
for bad in ["tokenizers.plugins.scalar.bins=0", "tokenizers.plugins.scalar.binz=3", "tokenizers.plugins.audio.x=1",
            "tokenizers.plugins.vidoe.x=1", "data.tasks.t.source=vidoe"]:
    try:
        load_config(None, base + [bad])
    except ConfigError as err:
        errors.append(str(err))
print(json.dumps({"names": TOKENIZERS.names(), "values": tokenizer([1, 2, 3, 4, 5, 6]).values.tolist(),
                  "spec": tokenizer.embed_spec().input_dim, "errors": errors}))
"""


def test_an_installed_plugin_is_a_modality_of_the_recipe(plugin_site, tmp_path):
    """In a fresh interpreter, as a user's run would meet it: TOKENIZERS, the config tree, the builder."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), str(REPO)])}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["names"] == ["audio", "broken", "image", "scalar", "text"]
    assert result["values"] == [[1, 2, 3], [4, 5, 6]] and result["spec"] == 3
    assert result["errors"] == [
        "tokenizers.plugins.scalar.bins=0: must be >= 1",
        "tokenizers.plugins.scalar.binz=3: unknown key; known keys: bins; did you mean 'plugins.scalar.bins'?",
        "tokenizers.plugins.audio={'x': 1}: audio is built in; configure it under tokenizers.audio",
        "tokenizers.plugins.vidoe={'x': 1}: no tokenizer of that name is installed; known: audio, broken, image, "
        "scalar, text",
        "data.tasks.t.source='vidoe': unknown modality 'vidoe'; known: audio, broken, image, "
        "scalar, text",
    ]


USER_MODULE_PROBE = """
import json
from polytrain.config import load_config
from polytrain.errors import ConfigError
from polytrain.config.registries import EMBEDDERS
from polytrain.config.registries import TOKENIZERS

base = ["data.tasks.t.head=encoder_decoder", "data.tasks.t.source=scalar", "data.tasks.t.train=m.jsonl",
        "data.tasks.t.val=m.jsonl"]
cfg = load_config(None, base + ["plugins=[myscalar]", "tokenizers.plugins.scalar.bins=2"])
errors = []
for bad in (["plugins=[nosuchmodule]"], ["plugins=[brokenplug]"]):
    try:
        load_config(None, base + bad)
    except ConfigError as err:
        errors.append(str(err))
print(json.dumps({"plugins": cfg.plugins, "tokenizer": TOKENIZERS.get("scalar").__module__,
                  "embedder": EMBEDDERS.get("scalar").__name__, "errors": errors}))
"""


def test_a_user_module_named_in_the_recipe_registers_a_modality(tmp_path):
    """No package, no entry point: registry calls in a module the recipe lists under ``plugins``."""
    (tmp_path / "myscalar.py").write_text(PLUGIN + textwrap.dedent("""
        from polytrain.models.embed import PatchEmbedder
        from polytrain.config.registries import EMBEDDERS
        from polytrain.config.registries import TOKENIZERS

        TOKENIZERS.register("scalar")(ScalarTokenizer)
        EMBEDDERS.register("scalar")(PatchEmbedder)
        """))
    (tmp_path / "brokenplug.py").write_text("raise RuntimeError('half-written plugin')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", USER_MODULE_PROBE], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["plugins"] == ["myscalar"] and result["tokenizer"] == "myscalar"
    assert result["embedder"] == "PatchEmbedder"
    assert result["errors"][0].startswith("plugins.0='nosuchmodule': failed to import: ModuleNotFoundError")
    assert result["errors"][1:] == ["plugins.0='brokenplug': failed to import: RuntimeError: half-written plugin"]


LAYOUT_PLUGIN = '''
from dataclasses import replace

from polytrain.config.registries import HEADS, LAYOUTS
from polytrain.models.heads import DecoderOnlyHead
from polytrain.platform.data.layouts import Causal


class Reversed(Causal):
    """decoder_only's layout, the words of each text segment in reverse order."""

    def example(self, ds, record):
        parts = tuple(replace(p, value=" ".join(reversed(p.value.split()))) if p.modality == "text" else p
                      for p in record.parts)
        return super().example(ds, replace(record, parts=parts))


class ReversingLM(DecoderOnlyHead):
    kind = replace(DecoderOnlyHead.kind, layout="reversed")


HEADS.register("reversing_lm")(ReversingLM)
LAYOUTS.register("reversed")(Reversed)
'''
LAYOUT_PROBE = """
import json, sys
from polytrain.job import resolve
from polytrain.platform.data.datasets import build_datasets

job = resolve(sys.argv[1], sys.argv[2:])
example = build_datasets(job.cfg, "train", job.tokenizers, job.manifests)["t"][0]
text = job.tokenizers["text"]
print(json.dumps({"inputs": example.inputs.ids, "bos": text.bos_id, "prompt": text.encode("it is which"),
                  "answer": text.encode("seven one")}))
"""


def test_a_plugin_head_brings_its_own_data_layout(tmp_path):
    """A head of a user module names a layout of its own (``LAYOUTS``): its samples are laid out by it, and
    ``polytrain train`` trains it, no file of polytrain knowing either name."""
    (tmp_path / "reversing.py").write_text(LAYOUT_PLUGIN)
    line = json.dumps({"segments": [{"text": "which is it"}, {"text": "one seven", "scored": True}]})
    (tmp_path / "m.jsonl").write_text("\n".join([line] * 8) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""
        plugins: [reversing]
        model: {{backbone: {{dim: 32, n_heads: 2, encoder_layers: 0, decoder_layers: 1}}}}
        tokenizers: {{text: {{vocab_size: 300, max_len: 32}}}}
        data:
          cache_dir: {tmp_path / "cache"}
          tasks: {{t: {{head: reversing_lm, train: m.jsonl, val: m.jsonl, batch_size: 4, seq_len: 16}}}}
        train: {{steps: 2, warmup_steps: 1, out_dir: {tmp_path / "runs"}, run_name: run}}
        engine: {{zero_stage: 0}}
        tracking: {{progress_bar: false}}
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    probe = subprocess.run([sys.executable, "-c", LAYOUT_PROBE, recipe], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    laid = json.loads(probe.stdout.splitlines()[-1])
    assert laid["inputs"] == [laid["bos"], *laid["prompt"], *laid["answer"]]  # the words reversed, eos the label
    proc = subprocess.run([sys.executable, "-m", "polytrain.cli", "train", recipe], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "runs" / "run" / "eval.json").read_text())["t"]["val_loss"] > 0
