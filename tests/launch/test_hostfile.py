"""Hostfiles: read as DeepSpeed reads them; every bad line is refused with its file and line."""

import pytest
from deepspeed.launcher.runner import fetch_hostfile

from polytrain.launch.hostfile import HostfileError, read_hostfile

GOOD = """\
# the cluster
worker-0 slots=8
worker_1\tslots=4   # underscores: /etc/hosts allows them

10.0.0.7 slots=2
"""


def test_hosts_slots_and_lines_agree_with_deepspeeds_parser(tmp_path):
    path = tmp_path / "hosts"
    path.write_text(GOOD)
    hosts = read_hostfile(path)
    assert [(h.name, h.slots) for h in hosts] == list(fetch_hostfile(str(path)).items())
    assert [(h.name, h.slots, h.where) for h in hosts] == [
        ("worker-0", 8, f"{path}:2"), ("worker_1", 4, f"{path}:3"), ("10.0.0.7", 2, f"{path}:5")]


@pytest.mark.parametrize("text, message", [
    ("worker-0 slots=8\n# spare\nworker-0 slots=4\n", ":3: host 'worker-0' is already listed on line 1"),
    ("worker-0 slots=0\n", ":1: slots='0' for worker-0: must be a whole number >= 1"),
    ("a slots=1\nworker-0 slots=-2\n", ":2: slots='-2' for worker-0: must be a whole number >= 1"),
    ("worker-0 slots=\n", ":1: slots='' for worker-0: must be a whole number >= 1"),
    ("worker-0\n", ":1: 'worker-0' is not 'HOST slots=N'"),
    ("worker-0 slots=8 gpus=8\n", ":1: 'worker-0 slots=8 gpus=8' is not 'HOST slots=N'"),
    ("root@worker-0 slots=8\n", ":1: 'root@worker-0' is neither a host name"),
    ("worker-0:2222 slots=8\n", ":1: 'worker-0:2222' is neither a host name"),
    ("-worker slots=8\n", ":1: '-worker' is neither a host name"),
    ("ssh://worker-0 slots=8\n", ":1: 'ssh://worker-0' is neither a host name"),
])
def test_bad_line_is_named(tmp_path, text, message):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(HostfileError) as err:
        read_hostfile(path)
    assert str(err.value).startswith(f"{path}{message}")


def test_ipv6_address_is_a_host(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("fd00::7 slots=2\n")
    assert [(h.name, h.slots) for h in read_hostfile(path)] == [("fd00::7", 2)]


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"])
def test_hostfile_without_hosts(tmp_path, text):
    path = tmp_path / "hosts"
    path.write_text(text)
    with pytest.raises(HostfileError, match=f"^{path}: lists no hosts"):
        read_hostfile(path)


def test_missing_hostfile(tmp_path):
    with pytest.raises(HostfileError, match=f"^{tmp_path / 'nope'}: cannot read the hostfile"):
        read_hostfile(tmp_path / "nope")
