import json

from PIL import Image

from polytrain.platform.data.builtin import WORDS, resolve_manifest


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_digit_images(data_cache):
    train, val = (lines(resolve_manifest(f"builtin:digits_image/{s}", data_cache)) for s in ("train", "val"))
    assert (len(train), len(val)) == (1437, 360)  # scikit-learn's 1797 digits, every 5th held out
    assert {row["target"] for row in val} == set(WORDS)
    image = Image.open(data_cache / "digits_image" / val[0]["image"])
    assert (image.mode, image.size) == ("L", (8, 8))


def test_spoken_digits_hold_out_whole_speakers(data_cache):
    train, val = (lines(resolve_manifest(f"builtin:spoken_digits/{s}", data_cache)) for s in ("train", "val"))
    assert (len(train), len(val)) == (240, 60)
    speakers = lambda rows: {row["id"].split("_")[0] for row in rows}  # noqa: E731
    assert not speakers(train) & speakers(val)
    assert all(row["target"] == WORDS[int(row["id"].split("_")[1])] for row in train + val)


def test_stdlib_corpus_is_this_pythons_source(data_cache):
    train, val = (lines(resolve_manifest(f"builtin:stdlib/{s}", data_cache)) for s in ("train", "val"))
    ids = {row["id"] for row in train + val}
    assert "stdlib/os.py" in ids and not {r["id"] for r in train} & {r["id"] for r in val}
    os_source = next(row["text"] for row in train + val if row["id"] == "stdlib/os.py")
    import os
    assert os_source == open(os.__file__, encoding="utf-8").read()


def test_plain_paths_pass_through(tmp_path):
    assert resolve_manifest(str(tmp_path / "m.jsonl"), tmp_path) == tmp_path / "m.jsonl"
