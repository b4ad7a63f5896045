import json

from PIL import Image

from polytrain.platform.data.builtin import WORDS, dataset_folder, resolve_manifest
from polytrain.platform.data.manifest import read_manifest


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_digit_images(data_cache):
    train, val = (lines(resolve_manifest(f"builtin:digits_image/{s}", data_cache)) for s in ("train", "val"))
    assert (len(train), len(val)) == (1437, 360)  # scikit-learn's 1797 digits, every 5th held out
    assert {row["target"] for row in val} == set(WORDS) and all(row["label"] == row["target"] for row in val)
    image = Image.open(data_cache / dataset_folder("digits_image") / val[0]["image"])
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


def test_question_datasets_ask_every_digit_three_questions(data_cache):
    images = read_manifest(resolve_manifest("builtin:digits_image_qa/val", data_cache), "qa", False)
    clips = read_manifest(resolve_manifest("builtin:spoken_digits_qa/train", data_cache), "qa", False)
    assert (len(images), len(clips)) == (3 * 360, 3 * 240)
    plain = lines(resolve_manifest("builtin:digits_image/val", data_cache))
    seven = next(row for row in plain if row["target"] == "seven")
    asked = [r for r in images if r.sample_id.startswith(seven["image"].split("/")[1].removesuffix(".png"))]
    assert [(r.parts[1].value, r.scored_text) for r in asked] == [
        ("Which digit is it?", "seven"), ("Is it even?", "no"), ("What is it plus one?", "eight")]
    assert asked[0].parts[0].modality == "image" and Image.open(asked[0].parts[0].value).size == (8, 8)
    nine = [r for r in clips if r.sample_id.endswith("_9/q2")]
    assert nine and all(r.scored_text == "ten" and r.parts[0].modality == "audio" for r in nine)


def test_long_clips_hold_their_target_digits_in_order_in_their_slots(data_cache):
    import numpy as np
    import soundfile

    from polytrain.platform.data.builtin import JITTER_SECONDS, LONG_CLIPS, SLOT_SECONDS, spoken_clips

    manifest = resolve_manifest("builtin:long_spoken_digits/val", data_cache)
    rows = lines(manifest)
    assert len(rows) == LONG_CLIPS["val"] and len(lines(manifest.with_name("train.jsonl"))) == LONG_CLIPS["train"]
    held_out = {}  # digit -> the held-out speakers' clips of it
    for path, digit, split in spoken_clips():
        if split == "val":
            held_out.setdefault(digit, []).append(soundfile.read(path, dtype="float32")[0])
    for row in rows[:4]:
        clip, rate = soundfile.read(manifest.parent / row["audio"], dtype="float32")
        words = row["target"].split()
        assert 10 <= len(words) <= 13 and len(clip) == len(words) * int(SLOT_SECONDS * rate)  # 22 to 28.6 s
        slot, jitter = int(SLOT_SECONDS * rate), int(JITTER_SECONDS * rate)
        for k, word in enumerate(words):
            piece = clip[k * slot:(k + 1) * slot]
            found = [offset for source in held_out[WORDS.index(word)] for offset in range(jitter)
                     if np.abs(piece[offset:offset + len(source)] - source).max() < 1e-3
                     and not piece[offset + len(source):].any() and not piece[:offset].any()]
            assert found, f"{row['id']}: slot {k} does not hold a held-out speaker's {word!r}"
