"""The wheels a lent GPU machine lacks, downloaded here into ``.whl/`` for ``scripts/gpu_check.py`` to install there.

The GPU image (the device tool's ``nvidia-h200`` kind: Python 3.12, torch 2.11.0+cu130, no registry in
reach) holds most of what polytrain needs; ``WHEELS`` is the rest, each with the reason it is there.
``make wheelhouse`` downloads them (DeepSpeed, published as an sdist only, is built into a wheel here with
its ops left to compile on first use), then checks that the set is complete and lean: one wheel per
package, each installable on the target Python, every ``Requires-Dist`` of polytrain and of every wheel
met by a wheel or by a package the image holds (at a version that fits, where the image's is known), and
no wheel that nothing needs.  Last it prints the size and fails if the wheels and the tree that travels
with them exceed what the device tool carries.

    python scripts/wheelhouse.py [--python-version 3.12] [--dest .whl]
"""

import argparse
import re
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path
from typing import Callable

from packaging import tags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent
DEVICE_PYTHON = "3.12"
"""The GPU image's Python (/opt/torch/.venv/bin/python3 there is 3.12.3)."""
TRAVEL_LIMIT = 64 * 2**20
"""Bytes the device tool carries per call: the working tree and the carried ``.whl`` together."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
"""Binary wheels the image's glibc loads (the device notes' list); pip matches each tag exactly."""

WHEELS: dict[str, tuple[str, str]] = {
    # polytrain's own requirements that the image lacks
    "deepspeed": ("0.19.8", "the engine (an sdist: built here into a wheel; its ops JIT-compile on first use)"),
    "wandb": ("0.31.0", "tracking.wandb (polytrain.platform.observe.tracking imports it when W&B is on)"),
    "soundfile": ("0.14.0", "audio files, tokenizers/audio_files.py (the wheel bundles libsndfile)"),
    # polytrain's own requirements that the image holds at another version than the pin
    "transformers": ("5.23.0", "the image has 5.17.0; accelerate's DeepSpeed plugin and models/convert.py use it"),
    "tokenizers": ("0.23.3", "the image has 0.23.2; the text tokenizer is built on it"),
    # what those need in turn and the image lacks
    "hjson": ("3.1.0", "deepspeed reads its config with it"),
    "pydantic": ("2.14.4", "deepspeed's config models; wandb"),
    "pydantic-core": ("2.50.5", "pydantic pins it (binary: cp312)"),
    "annotated-types": ("0.8.0", "pydantic"),
    "typing-inspection": ("0.4.5", "pydantic"),
    "cffi": ("2.1.1", "soundfile calls libsndfile through it (binary: cp312)"),
    "pycparser": ("3.12", "cffi"),
    "platformdirs": ("4.14.9", "wandb"),
    "cwevals": ("0.0.1b1", "wandb pins it"),
    "distro": ("1.9.0", "cwevals"),
    "sniffio": ("1.3.1", "cwevals"),
    "opentelemetry-api": ("1.45.2", "wandb"),
    "opentelemetry-sdk": ("1.45.2", "wandb"),
    "opentelemetry-semantic-conventions": ("0.66b2", "opentelemetry-sdk pins it"),
    "opentelemetry-exporter-otlp-proto-http": ("1.45.2", "wandb"),
    "opentelemetry-exporter-otlp-proto-common": ("1.45.2", "the otlp-proto-http exporter pins it"),
    "opentelemetry-exporter-otlp-common": ("0.66b2", "the otlp-proto-http exporter pins it"),
    "opentelemetry-exporter-http-transport": ("0.66b2", "the otlp-proto-http exporter pins it"),
    "opentelemetry-proto": ("1.45.2", "the otlp-proto-http exporter pins it"),
    "googleapis-common-protos": ("1.76.0", "the otlp-proto-http exporter"),
}
"""Package -> (version, why it is carried).  Versions are those the project's environment is tested with."""
BUILT = frozenset({"deepspeed"})
"""Published as sdists only: built here with ``pip wheel`` rather than downloaded."""

IMAGE_PACKAGES = frozenset(canonicalize_name(name) for name in """
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
    safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
    setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
    """.split())
"""Every package the GPU image holds (the device notes' KINDS.md, read on a machine on 2026-11-17)."""
IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                  "tokenizers": "0.23.2", "torch": "2.11.0", "torchaudio": "2.11.0", "torchvision": "0.26.0",
                  "transformers": "5.17.0", "triton": "3.6.0"}
"""The image's versions where a session has read them (KINDS.md's pip list); the others are checked there."""

Lookup = Callable[[str], tuple[str | None, list[Requirement]]]
"""Canonical name -> (version found or None if absent, the requirements to follow from it)."""


def marker_environment(python_version: str) -> dict[str, str]:
    """The values ``Requires-Dist`` markers are evaluated with on a Linux x86-64 CPython of that version."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}


def needed(lines: list[str], environment: dict[str, str], extras: tuple[str, ...] = ()) -> list[Requirement]:
    """The requirements among ``Requires-Dist`` lines that apply in ``environment`` with ``extras`` asked for."""
    out = []
    for line in lines:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({**environment, "extra": e}) for e in ("", *extras)):
            out.append(req)
    return out


def walk(roots: list[Requirement], lookup: Lookup, root_name: str = "polytrain") -> tuple[list[str], set[str]]:
    """Follow requirements from ``roots``: one line per requirement ``lookup`` cannot meet, naming who needs it,
    and the canonical names reached."""
    problems, seen = set(), set()
    todo = [(root_name, req) for req in roots]
    while todo:
        needer, req = todo.pop()
        name = canonicalize_name(req.name)
        version, requirements = lookup(name)
        if version is None:
            problems.add(f"{name} (needed by {needer}) is missing")
        elif version != "unknown" and not req.specifier.contains(version, prereleases=True):
            problems.add(f"{name} {version} does not satisfy {needer}'s {req}")
        if name not in seen:
            seen.add(name)
            todo += [(name, r) for r in requirements]
    return sorted(problems), seen


def wheel_requirements(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as wheel:
        metadata = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return Parser().parsestr(wheel.read(metadata).decode()).get_all("Requires-Dist") or []


def project_requirements(environment: dict[str, str]) -> list[Requirement]:
    """polytrain's dependencies and its ``test`` extra (the GPU check runs pytest), from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return needed(project["dependencies"] + project["optional-dependencies"]["test"], environment)


def problems_of(dest: Path, python_version: str) -> list[str]:
    """What is wrong with the wheels in ``dest`` for the image with that Python: one line per problem."""
    major, minor = map(int, python_version.split("."))
    supported = {*tags.cpython_tags((major, minor), platforms=PLATFORMS),
                 *tags.compatible_tags((major, minor), platforms=PLATFORMS)}
    found: dict[str, tuple[str, Path]] = {}
    problems = []
    for path in sorted(dest.glob("*.whl")):
        name, version, _, wheel_tags = parse_wheel_filename(path.name)
        if name in found:
            problems.append(f"{name}: two versions, {found[name][0]} and {version} (pip refuses to install both)")
        found[name] = (str(version), path)
        if not wheel_tags & supported:
            problems.append(f"{path.name}: not installable on CPython {python_version} manylinux x86-64")
    for name, (version, _) in WHEELS.items():
        if name not in found:
            problems.append(f"{name}=={version}: no wheel in {dest}")
        elif found[name][0] != version:
            problems.append(f"{name}: wheel {found[name][0]}, WHEELS pins {version}")
    problems += [f"{name}: a wheel that WHEELS does not list" for name in sorted(set(found) - set(WHEELS))]
    environment = marker_environment(python_version)
    requirements = {name: needed(wheel_requirements(path), environment) for name, (_, path) in found.items()}

    def lookup(name: str) -> tuple[str | None, list[Requirement]]:
        if name in found:
            return found[name][0], requirements[name]
        if name in IMAGE_PACKAGES:
            return IMAGE_VERSIONS.get(name, "unknown"), []
        return None, []

    unmet, reached = walk(project_requirements(environment), lookup)
    problems += unmet
    problems += [f"{name}: carried but polytrain does not need it" for name in sorted(set(found) - reached)]
    return problems


def download(dest: Path, python_version: str) -> None:
    """The pinned wheels into ``dest`` (emptied of wheels first, so no stale version stays beside a new one)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    fetched = [f"{name}=={version}" for name, (version, _) in WHEELS.items() if name not in BUILT]
    built = [f"{name}=={WHEELS[name][0]}" for name in sorted(BUILT)]
    for command in (["download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                     "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", dest, *fetched],
                    ["wheel", "--no-deps", "-w", dest, *built]):
        if subprocess.run([*pip, *command]).returncode:
            sys.exit(f"wheelhouse: error: pip {command[0]} failed (its output is above)")


def travelling_tree_bytes() -> int:
    """Bytes of the files the device tool sends besides carried paths: tracked and untracked-not-ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.split(b"\0")
    return sum((REPO / name.decode()).stat().st_size for name in listed if name and (REPO / name.decode()).is_file())


def python_version(text: str) -> str:
    if not re.fullmatch(r"3\.\d+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a Python version such as 3.12")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", type=python_version, default=DEVICE_PYTHON,
                        help="the target's X.Y (default: the image's)")
    parser.add_argument("--dest", type=Path, default=REPO / ".whl")
    args = parser.parse_args()
    download(args.dest, args.python_version)
    problems = problems_of(args.dest, args.python_version)
    wheels = sorted(args.dest.glob("*.whl"), key=lambda p: -p.stat().st_size)
    for path in wheels:
        print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    total, tree = sum(p.stat().st_size for p in wheels), travelling_tree_bytes()
    print(f"{len(wheels)} wheels for CPython {args.python_version}: {total / 2**20:.1f} MiB; with the "
          f"{tree / 2**20:.1f} MiB tree that travels beside them {(total + tree) / 2**20:.1f} MiB of the "
          f"{TRAVEL_LIMIT / 2**20:.0f} MiB the device tool carries")
    if total + tree > TRAVEL_LIMIT:
        problems.append(f"{(total + tree) / 2**20:.1f} MiB is over the {TRAVEL_LIMIT / 2**20:.0f} MiB limit")
    for problem in problems:
        print(f"wheelhouse: error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
