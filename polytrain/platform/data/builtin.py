"""The embedded default data, materialized as manifests on first use (no network needed).

``builtin:<name>/<split>`` in a task's ``train`` / ``val`` resolves here:

- ``digits_image``: scikit-learn's 1,797 8x8 handwritten digits as PNG files,
  target and label the digit's word; every 5th image is held out.
- ``spoken_digits``: 300 clips shipped in ``polytrain/assets/spoken_digits``
  (30 espeak-ng speakers x 10 digit words, 16 kHz WAV); the last 6 speakers
  are held out, so validation voices are never heard in training.
- ``digits_image_qa``, ``spoken_digits_qa``: the same files, each asked three
  questions (which digit, is it even, what is it plus one) as segments:
  [file] [question] [scored answer].
- ``stdlib``: the running Python's own top-level standard-library ``.py``
  files, one document each; files whose name hashes to 0 mod 20 are held out.
"""

import json
import logging
import sys
import sysconfig
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from polytrain import atomic
from polytrain.config import Config
from polytrain.config.registries import BUILTINS
from polytrain.errors import DataError

log = logging.getLogger(__name__)

PREFIX = "builtin:"
PREPARED_PREFIX = "prepared:"
"""Names a prepared split's folder (``polytrain data prepare``); a plain path to one works too."""
SPLITS = ("train", "val")
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPOKEN_DIR = Path(__file__).resolve().parents[2] / "assets" / "spoken_digits"
HELD_OUT_SPEAKERS = 6
IMAGE_HOLDOUT_EVERY = 5
STDLIB_HOLDOUT_MOD = 20



def resolve_manifest(spec: str, cache_dir: str | Path) -> Path:
    """The manifest file (or prepared split's folder, ``prepared:DIR``) ``spec`` names, building a built-in
    dataset under ``cache_dir`` if needed."""
    if spec.startswith(PREPARED_PREFIX):
        return Path(spec[len(PREPARED_PREFIX):])
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


Manifests = dict[str, dict[str, Path]]
"""task -> split (train, val) -> its manifest file or prepared folder."""


def task_manifests(cfg: Config) -> Manifests:
    """The manifest file (or prepared folder) of every task's train and val split, building built-in data on
    first use."""
    return {name: {split: resolve_manifest(getattr(task, split), cfg.data.cache_dir) for split in SPLITS}
            for name, task in cfg.data.tasks.items()}


FORMAT = 2
"""Bumped when the built-in manifests change, so an older copy in a cache is rebuilt, not read."""


def dataset_folder(name: str) -> str:
    # The corpus differs between Python versions, so each version gets its own copy.
    version = f"-py{sys.version_info.major}{sys.version_info.minor}" if name == "stdlib" else ""
    return f"{name}{version}-v{FORMAT}"


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


def digit_images(folder: Path) -> list[tuple[str, int, str]]:
    """scikit-learn's digits saved under ``folder/images`` as PNG: (file, digit, split) of each."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (folder / "images").mkdir()
    saved = []
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        name = f"images/{i:04d}.png"
        pixels = np.round(image * (255 / 16)).astype(np.uint8)  # sklearn's values run 0..16
        Image.fromarray(pixels, mode="L").save(folder / name)
        saved.append((name, int(label), "val" if i % IMAGE_HOLDOUT_EVERY == 0 else "train"))
    return saved


def spoken_clips() -> list[tuple[str, int, str]]:
    """The shipped clips: (path, digit, split); the last speakers are held out."""
    speakers = [s["speaker"] for s in json.loads((SPOKEN_DIR / "speakers.json").read_text())]
    held_out = set(speakers[-HELD_OUT_SPEAKERS:])
    return [(str(SPOKEN_DIR / f"{speaker}_{digit}.wav"), digit, "val" if speaker in held_out else "train")
            for speaker in speakers for digit in range(len(WORDS))]


QUESTIONS = (
    ("Which digit is it?", lambda d: WORDS[d]),
    ("Is it even?", lambda d: "yes" if d % 2 == 0 else "no"),
    ("What is it plus one?", lambda d: WORDS[d + 1] if d + 1 < len(WORDS) else "ten"),
)
"""The questions the QA datasets ask of every digit, and their answers."""


def by_split(lines: Iterable[tuple[str, dict]]) -> dict[str, list[dict]]:
    splits = {split: [] for split in SPLITS}
    for split, line in lines:
        splits[split].append(line)
    return splits


def digits_image(folder: Path) -> dict[str, list[dict]]:
    return by_split((split, {"image": name, "target": WORDS[d], "label": WORDS[d], "id": f"digit{i:04d}"})
                    for i, (name, d, split) in enumerate(digit_images(folder)))


def spoken_digits(folder: Path) -> dict[str, list[dict]]:
    return by_split((split, {"audio": clip, "target": WORDS[d], "label": WORDS[d], "id": Path(clip).stem})
                    for clip, d, split in spoken_clips())


def questions(modality: str, files: list[tuple[str, int, str]], stem) -> dict[str, list[dict]]:
    """Every file asked every question: [file] [question] [scored answer]."""
    return by_split((split, {"segments": [{modality: file}, {"text": question}, {"text": answer(d), "scored": True}],
                             "id": f"{stem(file)}/q{q}"})
                    for file, d, split in files for q, (question, answer) in enumerate(QUESTIONS))


def digits_image_qa(folder: Path) -> dict[str, list[dict]]:
    return questions("image", digit_images(folder), lambda file: Path(file).stem)


def spoken_digits_qa(folder: Path) -> dict[str, list[dict]]:
    return questions("audio", spoken_clips(), lambda file: Path(file).stem)


def stdlib(folder: Path) -> dict[str, list[dict]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise DataError(f"no .py files in the standard library folder {root}")
    splits = {split: [] for split in SPLITS}
    for path in files:
        split = "val" if zlib.crc32(path.name.encode()) % STDLIB_HOLDOUT_MOD == 0 else "train"
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:  # not seen in CPython's own files; never read half-decoded
            log.warning("stdlib: skipping %s, not UTF-8 (%s)", path, err.reason)
            continue
        splits[split].append({"text": text, "id": f"stdlib/{path.name}"})
    return splits
