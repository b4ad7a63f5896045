import numpy as np
import pytest

from polytrain.platform.data.file_map import ADVICE, FileMap, npy_array

needs_advice = pytest.mark.skipif(not ADVICE, reason="madvise(MADV_RANDOM / MADV_DONTNEED) is Linux's")


def resident_kib(path) -> int:
    """kB of the mappings of ``path`` (a file, or every file under a folder) resident in this process."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            inside = len(fields) > 5 and (fields[5] == str(path) or fields[5].startswith(f"{path}/"))
        elif inside and fields[0] == "Rss:":
            total += int(fields[1])
    return total


@needs_advice
def test_pages_read_leave_the_process_on_release_and_views_stay_valid(tmp_path):
    path = tmp_path / "ids.bin"
    values = np.arange(8 * 2**20 // 4, dtype=np.uint32)  # 8 MiB
    values.tofile(path)
    mapped = FileMap(path)
    view = mapped.array(np.uint32)
    assert int(view.sum(dtype=np.uint64)) == int(values.sum(dtype=np.uint64))  # every page read
    assert resident_kib(path) >= 8 * 1024 - 4
    mapped.release()
    assert resident_kib(path) == 0
    assert view[123_456] == 123_456 and view[-1] == values[-1]  # faulted back in from the page cache


@pytest.mark.parametrize("array", [np.arange(7, dtype=np.int64), np.arange(12, dtype=np.float32).reshape(3, 4),
                                   np.zeros(0, dtype=np.int64)])
def test_npy_arrays_read_as_numpy_loads_them(tmp_path, array):
    np.save(tmp_path / "a.npy", array)
    got, _ = npy_array(tmp_path / "a.npy")
    want = np.load(tmp_path / "a.npy")
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    assert not got.flags.writeable


def test_npy_files_it_cannot_map_as_they_are_are_refused(tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(np.arange(6).reshape(2, 3)))
    with pytest.raises(ValueError, match="C-order"):
        npy_array(tmp_path / "f.npy")
    np.save(tmp_path / "t.npy", np.arange(100, dtype=np.int64))
    (tmp_path / "t.npy").write_bytes((tmp_path / "t.npy").read_bytes()[:-80])
    with pytest.raises(ValueError, match="too few"):
        npy_array(tmp_path / "t.npy")
