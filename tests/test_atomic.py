"""Files and folders are replaced whole or not at all; a failed write leaves the old version and no debris."""

import pytest

from polytrain import atomic


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "eval.json"
    atomic.write_text(path, "old\n")

    def half_then_fail(tmp):
        tmp.write_text("ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.write(path, half_then_fail)
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    atomic.write_text(path, "new\n")
    assert path.read_text() == "new\n"


def test_a_folder_appears_complete_and_a_failed_build_leaves_nothing(tmp_path):
    final = tmp_path / "data"
    with pytest.raises(RuntimeError):
        with atomic.folder(final) as tmp:
            (tmp / "a.jsonl").write_text("{}\n")
            raise RuntimeError("builder failed")
    assert list(tmp_path.iterdir()) == []
    with atomic.folder(final) as tmp:
        (tmp / "a.jsonl").write_text("{}\n")
        assert not final.exists()  # nothing is visible until the block ends
    assert (final / "a.jsonl").read_text() == "{}\n"


def test_a_second_identical_build_keeps_the_first_unless_asked_to_replace(tmp_path):
    final = tmp_path / "data"
    with atomic.folder(final, replace=False) as tmp:
        (tmp / "v").write_text("first")
    with atomic.folder(final, replace=False) as tmp:
        (tmp / "v").write_text("second")
    assert (final / "v").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["data"]
    with atomic.folder(final) as tmp:
        (tmp / "v").write_text("third")
    assert (final / "v").read_text() == "third"
