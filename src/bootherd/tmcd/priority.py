"""Which TMCD request an overloaded server answers first (the rules of bootherd.backlog).

Pure: a request, who sent it and the node states in, its backlog key and class out.

- class 0: from a node in TBSETUP, which has its configuration and is finishing its boot
  (`state ISUP` and what the files phase asks);
- class 1: any other; a node's first `status` starts a boot, so it waits for the boots
  being finished.

The key is (source address, request bytes): tmcc's retry of a request still waiting (its
first connection timed out on its side) is answered with the first one's reply, decided
once.  No class has a deadline: TCP keeps a request until it is answered or its client
gives up, and an answer to a client that gave up costs one write.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from ..inventory.model import Snapshot
from ..netaddr import norm_ip

STARTED, NEW = 0, 1
STARTED_STATES = frozenset({"TBSETUP"})
DEADLINES = (None, None)


def classify(peer_ip: str, data: bytes, snap: Snapshot,
             state_of: Callable[[str], str | None] | None) -> tuple[Hashable, int]:
    """(backlog key, class) of one request."""
    key = (peer_ip, data)
    if state_of is None:
        return key, NEW
    node = snap.by_ip.get(norm_ip(peer_ip))
    if node is not None and state_of(node.node_id) in STARTED_STATES:
        return key, STARTED
    return key, NEW
