"""DeepSpeed-format hostfiles: one ``HOST slots=N`` line per machine.

```
# comments and blank lines are ignored
worker-0 slots=8
worker-1 slots=8   # a comment may follow an entry
10.0.0.7 slots=4
```

The same file drives the deepspeed launcher (which starts every node over ssh)
and, for torchrun, names the nodes in a dry run and supplies node 0's address.
Every mistake is reported with the file and line.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from polytrain.config.launch import is_reachable_name
from polytrain.errors import PolytrainError

ENTRY = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>\S*)")


class HostfileError(PolytrainError):
    """A hostfile that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Host:
    name: str
    """Host name or IP address, as ssh and the other nodes reach it."""
    slots: int
    """Processes (GPUs) this host can run."""
    where: str
    """``<hostfile>:<line>``, for messages."""


def read_hostfile(path: str | Path) -> list[Host]:
    """The hosts listed in ``path``, in file order; raises ``HostfileError`` naming the bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise HostfileError(f"{path}: cannot read the hostfile ({err})") from None
    hosts: dict[str, Host] = {}
    for number, line in enumerate(lines, start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            host = parse_entry(entry, f"{path}:{number}")
            if host.name in hosts:
                raise HostfileError(f"{host.where}: host {host.name!r} is already listed on line "
                                    f"{hosts[host.name].where.rsplit(':', 1)[1]}")
            hosts[host.name] = host
    if not hosts:
        raise HostfileError(f"{path}: lists no hosts; expected lines like 'worker-0 slots=8'")
    return list(hosts.values())


def parse_entry(entry: str, where: str) -> Host:
    match = ENTRY.fullmatch(entry)
    if match is None:
        raise HostfileError(f"{where}: {entry!r} is not 'HOST slots=N'")
    name, slots = match["host"], match["slots"]
    if not is_reachable_name(name):
        raise HostfileError(f"{where}: {name!r} is neither a host name (letters, digits, '-', '_', '.') nor an "
                            f"IP address, so no node can reach it")
    if not slots.isdigit() or int(slots) < 1:
        raise HostfileError(f"{where}: slots={slots!r} for {name}: must be a whole number >= 1")
    return Host(name, int(slots), where)
