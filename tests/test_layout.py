"""The package's shape: reading a config needs no training stack, no module imports itself back or one of a layer
above it, a run's set-up goes down the layers once, every declared name resolves, and the run directory's files are
the ones the README lists."""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from polytrain.config.registries import HEADS, KERNELS, MLPS, NORMS, TOKENIZERS
from polytrain.platform.observe.run_dir import CheckpointDir, RunDir
from tests.helpers import REPO

PACKAGE = REPO / "polytrain"
HEAVY = ("torch", "deepspeed", "accelerate", "torchaudio", "transformers", "tokenizers", "wandb", "numpy")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_reading_and_checking_every_recipe_imports_no_training_stack():
    probe = ("import sys, pathlib\nfrom polytrain.config import load_config\n"
             "for path in sorted(pathlib.Path('configs').glob('*.yaml')):\n    load_config(path)\n"
             f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    done = run_python(probe)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_a_slurm_dry_run_for_a_gpu_cluster_works_on_a_cpu_only_machine():
    probe = ("import sys\nfrom polytrain.cli import main\n"
             "code = main(['launch', 'configs/multinode.yaml', 'engine.dist_backend=nccl', '--dry-run'])\n"
             f"print('heavy:', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\nsys.exit(code)")
    done = run_python(probe)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "#SBATCH --nodes=2" in done.stdout and "engine.dist_backend=nccl" in done.stdout
    assert done.stdout.strip().endswith("heavy: []")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The polytrain modules ``path`` imports anywhere in its file (function bodies and TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules}


LAYERS = (("polytrain", "polytrain.errors", "polytrain.atomic", "polytrain.registry", "polytrain.schema"),
          ("polytrain.config",), ("polytrain.tokens",), ("polytrain.tokenizers",), ("polytrain.models",),
          ("polytrain.platform", "polytrain.platform.data", "polytrain.platform.observe"),
          ("polytrain.platform.distributed",), ("polytrain.platform.train",), ("polytrain.job",),
          ("polytrain.launch",), ("polytrain.cli",))
"""From the bottom up: a module may import its own layer and those below, never one above."""


def layer(module: str) -> int:
    """The layer of ``module``: that of its longest prefix in ``LAYERS``."""
    return max((len(prefix), i) for i, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + "."))[1]


def test_no_module_imports_one_of_a_layer_above_it():
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    upward = [f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
              for name, path in sorted(files.items())
              for target in sorted(imports_of(path, set(files))) if layer(target) > layer(name)]
    assert not upward, upward
    assert layer("polytrain.config.model") == 1 and layer("polytrain.job") == 8 and layer("polytrain.cli") == 10


def test_a_runs_set_up_goes_down_the_layers_once(tmp_path, data_cache):
    """Following the config from polytrain train to the first step (tests/walk.py): the files it reaches and how
    often it comes back into one it had left."""
    done = subprocess.run([sys.executable, "-m", "tests.walk", "train", REPO / "configs" / "tiny.yaml",
                           "train.steps=1", f"train.out_dir={tmp_path}", f"data.cache_dir={data_cache}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ,
                                                                                          "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    walked = json.loads(done.stdout.strip().splitlines()[-1])
    assert walked["visits"][:2] == ["polytrain/config/__init__.py", "polytrain/job.py"]
    assert walked["files"] <= 21 and walked["returns"] <= 15, walked


def test_no_module_imports_itself_back_through_others():
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: imports_of(path, set(files)) - {name} for name, path in files.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycle = trail[trail.index(target):] + [target] if target in trail else [name, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(graph) > 60  # the walk saw the whole package


@pytest.mark.parametrize("registry", [HEADS, NORMS, MLPS, KERNELS, TOKENIZERS], ids=lambda r: r.kind)
def test_every_declared_built_in_name_resolves_to_its_object(registry):
    for name in registry.names():
        assert registry.get(name) is not None, name


def test_the_readme_lists_every_file_of_the_run_directory():
    listing = re.search(r"## Runs and checkpoints\n.*?```\n(.*?)```", (REPO / "README.md").read_text(), re.S)[1]
    run, checkpoint = RunDir(Path("RUN")), CheckpointDir(Path("RUN/checkpoints/step_1"))
    names = {getattr(run, key).name for key in ("config", "metrics", "eval", "init_report", "report_png",
                                               "report_html", "tokenizer", "wandb", "latest")}
    names |= {getattr(checkpoint, key).name for key in ("weights", "shards", "universal", "rng", "config",
                                                        "tokenizer", "state")}
    names |= {run.samples(0).parent.name, run.tokenizer.parent.name, run.checkpoints.name}
    missing = sorted(name for name in names if name.split(".")[0] not in listing)
    assert not missing, f"README's run-directory listing lacks {missing}"
