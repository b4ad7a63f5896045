"""Every config value has a domain, checked when the config is read: random values of every type at every key of
the config tree load, or stop with one line naming a key, never a traceback; and a sample of those that load
trains, or stops in one line, never ending well with a NaN."""

import dataclasses
import json
import math
import re
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from polytrain.cli import one_line
from polytrain.config import Config, load_config
from polytrain.errors import ConfigError
from polytrain.schema import Range
from tests.helpers import polytrain, read_jsonl
from tests.platform.runs import TINY
from tests.test_cli import cli

RECIPE = yaml.safe_load(TINY.read_text())


def leaves(cls: type, prefix: str = "", tree: dict | None = None) -> list[str]:
    """The dotted key of every value of the config tree under ``cls``; the tasks are the tiny recipe's."""
    keys = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += leaves(tp, f"{key}.", (tree or {}).get(f.name))
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            for name in (tree or {}).get(f.name, {}):
                keys += leaves(typing.get_args(tp)[1], f"{key}.{name}.", tree[f.name][name])
        else:
            keys.append(key)
    return keys


KEYS = leaves(Config, tree=RECIPE)
SCALARS = st.one_of(
    st.integers(), st.sampled_from([0, -1, 1, 2, 3, 2**31, 2**32, 2**63, -2**63 - 1, 10**12, 10**30]),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 1e30, 1e-300, -0.0, 0.5, 1.0]),
    st.booleans(), st.none(), st.text(max_size=12),
    st.sampled_from(["", "nan", "-inf", "1e999", "a\0b", "..", "/", "/nonexistent/dir", "builtin:nothing/train",
                     "00:30", "2:00:00", "--x", "gloo", "rope", "auto"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=6), SCALARS, max_size=2))
ERROR = re.compile(r"polytrain: error: ([^=]+)=")
SECTIONS = {f.name for f in dataclasses.fields(Config)}


def override(key, value) -> str:
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=math.inf)}"


def test_the_walk_sees_every_section():
    assert len(KEYS) > 150
    assert {"train.lr", "model.backbone.dim", "data.tasks.text_lm.seq_len", "tokenizers.audio.n_mels",
            "launch.rdzv.timeout", "tracking.wandb.mode", "finetune.lora.alpha", "plugins"} <= set(KEYS)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_at_any_key_loads_or_names_a_key_in_one_line(capsys, key, value):
    proc = cli(capsys, "launch", TINY, override(key, value), "--dry-run")
    assert "Traceback" not in proc.stderr
    if proc.returncode == 0:
        return
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("polytrain: error: ")]
    assert len(lines) == 1, proc.stderr
    if isinstance(value, str) and lines[0].startswith(f"polytrain: error: {one_line(str(Path(value)))}: "):
        return  # a file the key names, and what is wrong with it
    named = ERROR.match(lines[0])
    assert named and named[1].split(".")[0] in SECTIONS, lines[0]
    # Another key's check names the factors it compares, the one given among them.
    assert named[1] == key or named[1].startswith(f"{key}.") or f"{key.split('.')[-1]}=" in lines[0], lines[0]


@pytest.mark.parametrize("item, message", [
    ("train.lr=nan", "train.lr='nan': must be a finite number"),
    ("model.backbone.norm_eps=.inf", "model.backbone.norm_eps=inf: must be a finite number"),
    ("model.init_std=1e999", "model.init_std='1e999': must be a finite number"),
    ("train.weight_decay=100000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"
     "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
     "must be a finite number"),
    ("train.seed=-1", "train.seed=-1: must be in 0..4294967295 (the seeds numpy, torch and Python all take)"),
    ("train.seed=4294967296", "train.seed=4294967296: must be in 0..4294967295"),
    ("model.backbone.dim=9223372036854775808", "must be an integer that fits in 64 bits"),
    ("train.betas=[0.9, .nan]", "train.betas.1=nan: must be a finite number"),
    ("train.betas=[0.9, 1.0]", "train.betas.1=1.0: must be in [0, 1)"),
    ('train.run_name="a\\0b"', "train.run_name='a\\x00b': must not contain a NUL character"),
    ("train.run_name=../elsewhere", "train.run_name='../elsewhere': must name one folder under out_dir"),
    ("train.lr=100", "train.weight_decay=0.01: times lr=100.0 must be < 1"),
    ("data.tasks.text_lm.weight=-1", "data.tasks.text_lm.weight=-1.0: must be >= 0"),
    ("tokenizers.audio.sample_rate=10", "tokenizers.audio.frame_shift_ms=10.0: must be at least one sample: >= 100 ms"),
    ("launch.rdzv.timeout=100000000000000", "launch.rdzv.timeout=100000000000000: must be in 1..10000000 seconds"),
])
def test_values_outside_their_domain_stop_with_the_key(capsys, item, message):
    proc = cli(capsys, "launch", TINY, item, "--dry-run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert message in proc.stderr.splitlines()[-1], proc.stderr


def test_a_range_says_what_it_allows():
    assert Range(gt=0).describe() == "must be > 0"
    assert Range(ge=1, le=65535, noun="a TCP port").describe(integers=True) == "must be a TCP port in 1..65535"
    assert Range(ge=0, lt=1).describe() == "must be in [0, 1)"
    assert Range(gt=0, le=1).describe() == "must be in (0, 1]"
    assert Range(ge=0, note="0: all").describe() == "must be >= 0 (0: all)"
    assert 0.5 in Range(ge=0, lt=1) and 1 not in Range(ge=0, lt=1) and 0 not in Range(gt=0)


SHORT = ("train.steps=2", "train.run_name=domain", "tracking.log_every=1")
UNTRAINED = ("launch.", "plugins", "tracking.wandb.", "train.steps", "data.cache_dir", "engine.offload_",
             "model.backbone.compile")
"""Keys a training run does not read (launch, W&B's network), or that would only make it long: the rest is tried."""


@pytest.mark.slow
@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.filter_too_much])
@given(key=st.sampled_from([k for k in KEYS if not k.startswith(UNTRAINED)]), value=VALUES)
def test_a_value_that_loads_trains_or_stops_in_one_line_never_ends_well_with_nan(tmp_path_factory, data_cache, key,
                                                                                 value):
    folder = tmp_path_factory.mktemp("domain")
    items = [f"train.out_dir={folder}", f"data.cache_dir={data_cache}", *SHORT, override(key, value)]
    try:
        cfg = load_config(TINY, items)
    except ConfigError:
        assume(False)
    proc = polytrain("train", TINY, *items, cwd=folder)
    item = items[-1]
    assert "Traceback" not in proc.stderr and proc.returncode in (0, 2), (item, proc.stderr[-3000:])
    if proc.returncode == 2:
        assert len([line for line in proc.stderr.splitlines() if line.startswith("polytrain: error: ")]) == 1
        return
    run = folder / cfg.train.out_dir / cfg.train.run_name
    results = json.loads((run / "eval.json").read_text())
    assert all(math.isfinite(v) for metrics in results.values() for v in metrics.values()), (item, results)
    assert all(math.isfinite(row["loss"]) for row in read_jsonl(run / "metrics.jsonl") if "loss" in row), item
