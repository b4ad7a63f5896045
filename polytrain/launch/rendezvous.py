"""How the nodes of a torchrun job find each other, and what a failed rendezvous tells the user.

static: node k is started with ``launch.node_rank=k``; node 0 hosts a TCP store on
``master_addr:master_port`` and waits for the others (ranks follow node order).
c10d: torchrun's dynamic rendezvous; the node whose address is ``master_addr``
hosts it, the nodes may start in any order and get their ranks as they join (a
one-node job is ``torchrun --standalone``: a store on a free port).  Either way
a node that never arrives ends the wait after about ``timeout`` seconds with a
message naming the rendezvous, instead of a silent hang.
"""

import re

from polytrain.config.launch import RendezvousConfig
from polytrain.launch.failures import LaunchError


class RendezvousError(LaunchError):
    """The nodes of a job did not all meet."""


JOINED = re.compile(r"(\d+)/(\d+) clients joined")


def rendezvous_error(cfg: RendezvousConfig, master_addr: str, master_port: int, nodes: int, node_rank: int,
                     err: Exception, waited: float) -> RendezvousError:
    """One line for a rendezvous that failed with torch's ``err`` after ``waited`` seconds: which rendezvous,
    after how long, what to check."""
    timed_out, store_timed_out, unreachable, store_unreachable = rendezvous_failures()
    where = f"the {cfg.backend} rendezvous {cfg.id!r} on {master_addr}:{master_port}"
    # A node that cannot reach the host retries, so it may wait a few times launch.rdzv.timeout.
    after = f"after {waited:.0f} s of waiting (launch.rdzv.timeout={cfg.timeout} s)"
    remedy = (f"start `polytrain launch` on every node with the same launch.nodes, launch.master_addr, "
              f"launch.master_port and launch.rdzv settings, check that {master_addr}:{master_port} is reachable "
              f"from each node, or raise launch.rdzv.timeout")
    if isinstance(err, (timed_out, store_timed_out)):
        joined = JOINED.search(str(err))
        count = f"only {joined[1]} of {nodes} nodes arrived" if joined else f"not all {nodes} nodes arrived"
        return RendezvousError(f"{where} timed out {after}: {count}; {remedy}")
    if isinstance(err, unreachable) and "failed to listen" in str(err):
        return RendezvousError(f"node {node_rank} cannot host {where}: port {master_port} is in use on this machine; "
                               f"set launch.master_port to a free port on every node")
    if isinstance(err, (unreachable, store_unreachable)):
        node, host = (f"node {node_rank}", "node 0") if cfg.backend == "static" else ("this node", "its host")
        return RendezvousError(f"{node} could not reach {where} {after}: {host} never came up or is "
                               f"unreachable; {remedy}")
    raise TypeError(f"not a rendezvous failure: {err!r}")


def rendezvous_failures() -> tuple[type[Exception], ...]:
    """The exceptions torch raises when nodes do not meet (imported late: torch is heavy): c10d's timeout,
    the static store's timeout, a store that cannot be reached (or a port that cannot be bound), c10d's
    store that cannot be reached."""
    from torch.distributed import DistNetworkError, DistStoreError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError

    return RendezvousTimeoutError, DistStoreError, DistNetworkError, RendezvousConnectionError
