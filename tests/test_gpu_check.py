"""The GPU check proven where there is no GPU: the wheelhouse completes an environment that holds only what
the GPU image holds, and polytrain imports and trains there exactly as in the project's environment.

The throwaway environment is a venv whose site-packages links (never copies, so torch is not downloaded again)
the project environment's distributions that the image holds (``wheelhouse.IMAGE_PACKAGES``), and what those
need here but the image lacks by name: a newer release of an image package may need more than the image's
(this huggingface-hub needs httpx2 where the image's needs httpx). Nothing the wheelhouse brings is linked,
not even what the image holds at another version (transformers): there the carried wheel shadows the image's
copy, here it is the only one. The wheelhouse is built for the running Python into a temp folder, and
``scripts/gpu_check.py`` runs end to end on that environment's interpreter, its CUDA phases skipping (the bench
and the gpu tests themselves run on the CPU in the suite: ``tests/test_bench_step_gpu.py`` and the ``gpu``
marker), then reruns two phases with ``--only`` on that install, as on a warm GPU machine.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path, PurePosixPath

import pytest
from packaging.markers import default_environment
from packaging.utils import canonicalize_name

from tests.helpers import REPO, polytrain, read_jsonl

pytestmark = pytest.mark.slow

PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
ORDER = ["install", "imports", "bench", "train", "gpu_tests", "doctor", "launch"]
"""The figures first: the bench right after the environment is known to import."""


def script(name: str):
    """A module of scripts/ (they import each other by plain name, as scripts run from that folder do)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


wheelhouse, gpu_check, import_all = script("wheelhouse"), script("gpu_check"), script("import_all")


def image_distributions(source: Path) -> tuple[list[metadata.Distribution], list[metadata.Distribution]]:
    """(linked, left out): the distributions in ``source`` the image holds and the wheelhouse does not
    bring, plus what they need that neither names; and all the others."""
    dists = {canonicalize_name(d.name): d for d in metadata.distributions(path=[str(source)])}
    environment = {**default_environment(), "extra": ""}
    linked = {name for name in dists if name in wheelhouse.IMAGE_PACKAGES and name not in wheelhouse.WHEELS}
    todo = list(linked)
    while todo:
        for req in wheelhouse.needed(dists[todo.pop()].requires or [], environment):
            name = canonicalize_name(req.name)
            if name in dists and name not in linked and name not in wheelhouse.WHEELS:
                linked.add(name)
                todo.append(name)
    return [dists[n] for n in sorted(linked)], [d for n, d in dists.items() if n not in linked]


def link_distributions(source: Path, target: Path, linked, left_out) -> None:
    """Symlink into ``target`` every file of ``linked``: a whole folder wherever no file of ``left_out``
    lies in it (folders shared by both, such as namespace packages, are made and linked into)."""
    def files(dist):
        return {PurePosixPath(str(f)) for f in dist.files or [] if not str(f).startswith("..")}

    blocked = {parent for dist in left_out for path in files(dist) for parent in path.parents}
    links = set()
    for dist in linked:
        for path in files(dist):
            links.add(next(p for p in [*reversed(path.parents[:-1]), path] if p not in blocked))
    for link in sorted(links):
        (target / link).parent.mkdir(parents=True, exist_ok=True)
        (target / link).symlink_to(source / link)


def without_pythonpath() -> dict[str, str]:
    """This process's environment variables, less a PYTHONPATH that would show the image environment more."""
    return {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


@pytest.fixture(scope="module")
def image_python(tmp_path_factory) -> Path:
    """The interpreter of an environment holding what the GPU image holds, from this environment's packages."""
    env = tmp_path_factory.mktemp("image-env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    source = Path(sysconfig.get_paths()["purelib"])
    link_distributions(source, site, *image_distributions(source))
    return python


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> tuple[Path, str]:
    """The wheelhouse for the running Python, and what ``wheelhouse.py`` printed."""
    dest = tmp_path_factory.mktemp("wheels")
    done = subprocess.run([sys.executable, REPO / "scripts" / "wheelhouse.py", "--python-version", PYTHON_VERSION,
                           "--dest", dest], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return dest, done.stdout


@pytest.fixture(scope="module")
def checked(image_python, wheels, tmp_path_factory) -> tuple[dict, Path, Path, str]:
    """gpu_check.py run on the image-like environment: (its summary, its OUT folder, its work folder, what it
    printed)."""
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    done = run_check(image_python, "--out", out, "--wheels", wheels[0], "--work", work,
                     torch_extensions=tmp_path_factory.mktemp("torch-extensions"))  # not the project's cache
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), out, work, done.stdout


def run_check(python: Path, *args, torch_extensions: Path | None = None) -> subprocess.CompletedProcess:
    env = without_pythonpath()
    if torch_extensions is not None:
        env["TORCH_EXTENSIONS_DIR"] = str(torch_extensions)
    return subprocess.run([python, REPO / "scripts" / "gpu_check.py", *args], env=env, capture_output=True,
                          text=True, timeout=900)


def test_the_wheelhouse_holds_the_listed_pins_for_this_python_and_fits_the_carry_limit(wheels):
    dest, printed = wheels
    found = {}
    for path in dest.glob("*.whl"):
        name, version, *_ = path.name.split("-")
        found[canonicalize_name(name)] = version
    assert found == {name: version for name, (version, _) in wheelhouse.WHEELS.items()}
    total = sum(path.stat().st_size for path in dest.glob("*.whl"))
    assert f"{len(found)} wheels for CPython {PYTHON_VERSION}: {total / 2**20:.1f} MiB" in printed
    assert total + wheelhouse.travelling_tree_bytes() <= wheelhouse.TRAVEL_LIMIT


def test_the_wheelhouse_check_names_a_missing_wheel_and_a_second_version(wheels, tmp_path):
    dest, _ = wheels
    for path in dest.glob("*.whl"):
        if not path.name.startswith("sniffio-"):
            shutil.copy(path, tmp_path / path.name)
    hjson = next(tmp_path.glob("hjson-*.whl"))
    shutil.copy(hjson, tmp_path / hjson.name.replace("3.1.0", "3.0.0"))
    assert wheelhouse.problems_of(tmp_path, PYTHON_VERSION) == [
        "hjson: two versions, 3.0.0 and 3.1.0 (pip refuses to install both)",
        f"sniffio==1.3.1: no wheel in {tmp_path}",
        "sniffio (needed by cwevals) is missing"]


def test_the_image_environment_lacks_what_the_wheelhouse_brings(image_python):
    listing = "import json; from importlib import metadata; " \
              "print(json.dumps({d.name: d.version for d in metadata.distributions()}))"
    # -I: not the working directory either, where an editable install leaves polytrain.egg-info
    seen = json.loads(subprocess.run([image_python, "-I", "-c", listing], check=True, capture_output=True, text=True,
                                     env=without_pythonpath()).stdout)
    names = {canonicalize_name(name) for name in seen}
    assert names & set(wheelhouse.WHEELS) == set()
    assert seen["torch"] == metadata.version("torch")  # linked from this environment, not downloaded
    assert "polytrain" not in names


def test_gpu_check_runs_end_to_end_on_cpu_figures_first_and_says_why_each_cuda_phase_skips(checked):
    summary, out, _, printed = checked
    assert [phase.name for phase in gpu_check.PHASES] == ORDER
    assert re.findall(r"^\[gpu_check\] (\w+) \(limit", printed, re.MULTILINE) == ORDER
    statuses = {name: result["status"] for name, result in summary["phases"].items()}
    assert list(statuses) == ORDER
    assert statuses == {"install": "ok", "imports": "ok", "bench": "skipped", "train": "ok", "gpu_tests": "skipped",
                        "doctor": "ok", "launch": "skipped"}
    why = {name: result.get("why") for name, result in summary["phases"].items() if result["status"] == "skipped"}
    assert why == {"gpu_tests": "no CUDA device here, and the gpu-marked tests need one",
                   "bench": "no CUDA device here, and bench/step_gpu.py needs one",
                   "launch": "no CUDA device here, and a 2-process launch needs 2 GPUs"}
    assert sorted(p.name for p in out.iterdir()) == sorted(["gpu_check.json", *(f"{n}.log" for n in statuses)])
    assert len(list(out.iterdir())) <= gpu_check.MAX_FILES_BACK


def test_only_reruns_the_named_phases_on_the_earlier_install(checked, image_python, tmp_path):
    _, _, work, _ = checked
    done = run_check(image_python, "--only", "launch,bench", "--out", tmp_path, "--work", work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {name: result["status"] for name, result in summary["phases"].items()} == {"bench": "skipped",
                                                                                     "launch": "skipped"}
    assert summary["machine"]["gpus"] == [] and sorted(p.name for p in tmp_path.iterdir()) == [
        "bench.log", "gpu_check.json", "launch.log"]
    refused = run_check(image_python, "--only", "bench,trian", "--out", tmp_path, "--work", work)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "gpu_check.py: error: --only 'bench,trian': unknown phase(s) trian; known: " + ", ".join(ORDER))


def test_a_phase_that_raises_unexpectedly_fails_alone_with_its_last_line_and_the_next_runs(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "site" / "polytrain").mkdir(parents=True)  # an earlier run's install, as --only expects
    next_phase = []
    later = gpu_check.Phase("train", 30, lambda check, figures: next_phase.append(1))
    monkeypatch.setattr(gpu_check, "PHASES", (gpu_check.Phase("imports", 30, gpu_check.imports), later))
    # import_all.py's output with a warning printed last, where its JSON line should be
    monkeypatch.setattr(gpu_check.Check, "command", lambda self, *args, **kwargs: '{"imported": []}\na warning')
    code = gpu_check.main(["--only", "imports,train", "--out", str(tmp_path / "out"), "--work", str(work)])
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    imports = summary["phases"]["imports"]
    assert (code, imports["status"], imports["why"]) == (1, "failed", "JSONDecodeError: Expecting value: line 1 "
                                                                      "column 1 (char 0)")
    assert "Traceback" in (tmp_path / "out" / "imports.log").read_text()
    assert summary["phases"]["train"]["status"] == "ok" and next_phase == [1]


def test_the_gpu_tests_phase_runs_every_file_of_gpu_marked_tests_the_zero_step_first():
    marked = sorted(str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("test_*.py")
                    if re.search(r"^pytestmark = pytest\.mark\.gpu$", path.read_text(), re.MULTILINE))
    assert sorted(path for path, _ in gpu_check.GPU_TESTS) == marked
    assert gpu_check.GPU_TESTS[0][0] == "tests/platform/distributed/test_gpu_step.py"


def test_the_check_installs_exactly_the_wheelhouse_and_polytrain_and_every_pin_is_met(checked):
    summary, *_ = checked
    installed = summary["phases"]["install"]["installed"]
    installed = {canonicalize_name(name): version for name, version in installed.items()}
    assert installed == {"polytrain": "0.1.0", **{name: version for name, (version, _) in wheelhouse.WHEELS.items()}}
    assert summary["machine"]["gpus"] == [] and summary["phases"]["imports"]["requirements_unmet"] == []


def test_every_module_of_polytrain_imports_with_the_carried_libraries_from_the_wheelhouse(checked, image_python):
    summary, _, work, _ = checked
    imports = summary["phases"]["imports"]
    tracked = subprocess.run(["git", "ls-files", "polytrain/*.py"], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout.split()
    modules = sorted(".".join(PurePosixPath(f).with_suffix("").parts).removesuffix(".__init__") for f in tracked)
    assert sorted(imports["imported"]) == sorted(modules + list(import_all.LIBRARIES)) and imports["failed"] == {}
    site = work / "site"
    for library in ("polytrain", "deepspeed", "wandb", "soundfile", "pydantic", "transformers", "tokenizers"):
        assert Path(imports["paths"][library]).is_relative_to(site), library
    for library in ("torch", "accelerate", "timm"):
        assert Path(imports["paths"][library]).is_relative_to(image_python.parent.parent), library


def test_the_smoke_run_trains_exactly_as_the_project_environment_does(checked, tmp_path):
    summary, _, work, _ = checked
    recipe, *overrides = gpu_check.TRAIN["cpu"]
    done = polytrain("train", REPO / recipe, *overrides, f"train.out_dir={tmp_path}", "train.run_name=reference",
                     f"data.cache_dir={work / 'data'}", "tracking.progress_bar=false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = {str(r["step"]): r["loss"] for r in read_jsonl(tmp_path / "reference" / "metrics.jsonl") if "loss" in r}
    train = summary["phases"]["train"]
    assert train["device"] == "cpu" and train["world_size"] == 1
    assert sorted(train["loss"]) == ["1", "2"]
    assert train["loss"] == pytest.approx(reference, rel=1e-6)
