"""The embedded default data, materialized as manifests on first use (no network needed).

``builtin:<name>/<split>`` in a task's ``train`` / ``val`` resolves here:

- ``digits_image``: scikit-learn's 1,797 8x8 handwritten digits as PNG files,
  target the digit's word; every 5th image is held out.
- ``spoken_digits``: 300 clips shipped in ``polytrain/assets/spoken_digits``
  (30 espeak-ng speakers x 10 digit words, 16 kHz WAV); the last 6 speakers
  are held out, so validation voices are never heard in training.
- ``stdlib``: the running Python's own top-level standard-library ``.py``
  files, one document each; files whose name hashes to 0 mod 20 are held out.
"""

import json
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from polytrain import atomic
from polytrain.errors import DataError
from polytrain.registry import Registry

PREFIX = "builtin:"
SPLITS = ("train", "val")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPOKEN_DIR = Path(__file__).resolve().parents[2] / "assets" / "spoken_digits"
HELD_OUT_SPEAKERS = 6
IMAGE_HOLDOUT_EVERY = 5
STDLIB_HOLDOUT_MOD = 20

BUILTINS: Registry[Callable[[Path], dict[str, list[dict]]]] = Registry("builtin dataset", group="polytrain.datasets")
"""Builder by name: given a folder to put files in, returns the manifest lines of each split. Installed
packages add their own through the ``polytrain.datasets`` entry-point group."""


def resolve_manifest(spec: str, cache_dir: str | Path) -> Path:
    """The manifest file ``spec`` names, building a built-in dataset under ``cache_dir`` if needed."""
    if not spec.startswith(PREFIX):
        return Path(spec)
    name, _, split = spec[len(PREFIX):].partition("/")
    builder = BUILTINS.get(name)
    if split not in SPLITS:
        raise DataError(f"{spec}: split must be one of {', '.join(SPLITS)}")
    folder = Path(cache_dir) / dataset_folder(name)
    if not folder.is_dir():
        build_atomically(folder, builder)
    return folder / f"{split}.jsonl"


def dataset_folder(name: str) -> str:
    # The corpus differs between Python versions, so each version gets its own copy.
    return f"{name}-py{sys.version_info.major}{sys.version_info.minor}" if name == "stdlib" else name


def build_atomically(folder: Path, builder: Callable[[Path], dict[str, list[dict]]]) -> None:
    """Build into a private temporary folder, then rename it into place; concurrent builders are safe (the
    first to finish wins, the others' identical copies are dropped)."""
    with atomic.folder(folder, replace=False) as tmp:
        for split, lines in builder(tmp).items():
            write_jsonl(tmp / f"{split}.jsonl", lines)


def write_jsonl(path: Path, lines: Iterable[dict]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


@BUILTINS.register("digits_image")
def digits_image(folder: Path) -> dict[str, list[dict]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits = {split: [] for split in SPLITS}
    (folder / "images").mkdir()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        name = f"images/{i:04d}.png"
        pixels = np.round(image * (255 / 16)).astype(np.uint8)  # sklearn's values run 0..16
        Image.fromarray(pixels, mode="L").save(folder / name)
        split = "val" if i % IMAGE_HOLDOUT_EVERY == 0 else "train"
        splits[split].append({"image": name, "target": WORDS[label], "id": f"digit{i:04d}"})
    return splits


@BUILTINS.register("spoken_digits")
def spoken_digits(folder: Path) -> dict[str, list[dict]]:
    speakers = [s["speaker"] for s in json.loads((SPOKEN_DIR / "speakers.json").read_text())]
    held_out = set(speakers[-HELD_OUT_SPEAKERS:])
    splits = {split: [] for split in SPLITS}
    for speaker in speakers:
        for digit, word in enumerate(WORDS):
            clip = SPOKEN_DIR / f"{speaker}_{digit}.wav"
            split = "val" if speaker in held_out else "train"
            splits[split].append({"audio": str(clip), "target": word, "id": clip.stem})
    return splits


@BUILTINS.register("stdlib")
def stdlib(folder: Path) -> dict[str, list[dict]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise DataError(f"no .py files in the standard library folder {root}")
    splits = {split: [] for split in SPLITS}
    for path in files:
        split = "val" if zlib.crc32(path.name.encode()) % STDLIB_HOLDOUT_MOD == 0 else "train"
        text = path.read_text(encoding="utf-8", errors="replace")
        splits[split].append({"text": text, "id": f"stdlib/{path.name}"})
    return splits
