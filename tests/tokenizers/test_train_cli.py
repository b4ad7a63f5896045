"""``polytrain tokenizer train`` as a user runs it, in a fresh interpreter."""

import tokenizers

from polytrain.cli import main
from polytrain.config.tokenizers import SPECIAL_TOKENS
from tests.helpers import polytrain


def test_trains_a_standard_tokenizer_json_with_the_special_tokens(tmp_path):
    (tmp_path / "a.py").write_text("def add(a, b):\n    return a + b\n" * 50)
    (tmp_path / "b.txt").write_text("naïve café — 東京 🎉 seven eight nine\n" * 50)
    proc = polytrain("tokenizer", "train", "--modality", "text", "--input", tmp_path / "a.py", tmp_path / "b.txt",
                     "--vocab-size", "320", "--min-frequency", "3", "--out", tmp_path / "tok", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "tok" / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert [hf.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert 256 + len(SPECIAL_TOKENS) < hf.get_vocab_size() <= 320  # this small corpus may run out of merges first
    sample = "def add(a, b):\n    return 東京 🎉"
    assert hf.decode(hf.encode(sample).ids) == sample
    assert len(hf.encode(" return").ids) == 1 and len(hf.encode(" eight").ids) == 1  # frequent words merged


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    cases = [
        (["--modality", "image", "--input", "x"], "--modality='image': only text tokenizers are trained"),
        (["--modality", "vidoe", "--input", "x"], "unknown modality 'vidoe'; known: audio, image, text"),
        (["--input", "x", "--vocab-size", "100"], "--vocab-size=100: must exceed 265"),
        (["--input", str(tmp_path / "nope.txt")], f"{tmp_path / 'nope.txt'}: no such file"),
        (["--input", str(tmp_path / "latin1.txt")], f"{tmp_path / 'latin1.txt'}: cannot read as UTF-8 text"),
    ]
    for args, message in cases:  # in this process: the same entry point, without an interpreter start each
        assert main(["tokenizer", "train", *args, "--out", str(tmp_path / "tok")]) == 2
        stderr = capsys.readouterr().err
        assert stderr.startswith(f"polytrain: error: {message}") and len(stderr.strip().splitlines()) == 1, stderr
