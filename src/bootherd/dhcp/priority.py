"""Which DHCP request an overloaded server answers first (the rules of bootherd.backlog).

Pure: a datagram in, its backlog key and class out, from the fixed header and option 53
alone (no decode: this runs for every datagram read, before the engine decides any).

| class | requests | deadline |
|---|---|---|
| 0 | REQUEST (an offer was made: the client is one step from its lease) | none |
| 1 | RELEASE, DECLINE, INFORM, BOOTP, anything unreadable (the engine counts it) | none |
| 2 | DISCOVER (new work) | ``dhcp.discover_deadline`` |

The key is (chaddr, xid, message type): a firmware's retransmission of a request still
waiting is the same key, and is not queued twice.  A DISCOVER that has waited longer than
its deadline (3 s by default: PXE firmware sends its next DISCOVER after 4 s) is dropped
when its turn comes; its OFFER would come after the client had moved on.  The wait is
counted from its latest copy (a retransmission renews the waiting DISCOVER).
"""

from __future__ import annotations

from collections.abc import Hashable

DISCOVER_DEADLINE = 3.0
REQUEST, OTHER, DISCOVER = 0, 1, 2
_MAGIC = b"\x63\x82\x53\x63"
_TYPE_DISCOVER, _TYPE_REQUEST = 1, 3


def deadlines(discover_deadline: float = DISCOVER_DEADLINE) -> tuple[float | None, ...]:
    """Per class, the longest a request may wait."""
    return (None, None, discover_deadline if discover_deadline > 0 else None)


def message_type(data: bytes) -> int | None:
    """Option 53 of a DHCP message, or None (BOOTP, truncated, no magic cookie)."""
    if len(data) < 240 or data[236:240] != _MAGIC:
        return None
    i, n = 240, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            i += 1
            continue
        if code == 255 or i + 1 >= n:
            return None
        length = data[i + 1]
        if code == 53 and length >= 1 and i + 2 < n:
            return data[i + 2]
        i += 2 + length
    return None


def classify(data: bytes, addr: tuple) -> tuple[Hashable, int]:
    """(backlog key, class) of one datagram."""
    mtype = message_type(data)
    if mtype is None:
        # Unreadable or BOOTP: its own key (it is not a retransmission we can recognise).
        return (addr, data), OTHER
    key = (data[28:44], data[4:8], mtype)
    if mtype == _TYPE_REQUEST:
        return key, REQUEST
    if mtype == _TYPE_DISCOVER:
        return key, DISCOVER
    return key, OTHER
