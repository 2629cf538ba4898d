"""bootinfo, sans-IO: request bytes + source address + snapshot + the coordinator's
answer -> reply bytes.  No sockets, no clock, no memory.

Who a request speaks for: a REQUEST by its source address, a KEYED_REQUEST by
its key (a wide-area node); an unknown key gets no answer at all (never tell a
stranger what a node boots).  Packets that are not questions are ignored.  The
answer itself comes from `ask` (the lifecycle coordinator, which also records
what the node was told).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..boottype import BootType, order_kind
from ..inventory.model import Node, Snapshot
from ..policy import BootDecision
from . import codec
from .codec import BootWhat, CodecError, Opcode

# (snapshot, node or None for an unknown address, client version) -> decision
log = logging.getLogger("bootherd.bootinfo")

Ask = Callable[[Snapshot, Node | None, int], BootDecision]


def boot_what(decision: BootDecision, server: str = "") -> BootWhat:
    """The wire form of a policy decision; `server` is this server's address as the
    reply names it (where a bare kernel or MFS path is)."""
    t = decision.type
    cmd = decision.cmdline
    host = decision.server or server
    if t is BootType.MB:
        return BootWhat(t, server=host or "0.0.0.0", filename=decision.path, cmdline=cmd)
    if t is BootType.MFS:
        mfs = f"{host}:{decision.path}" if host else decision.path
        return BootWhat(t, mfs=mfs, cmdline=cmd)
    if t is BootType.PART:
        return BootWhat(t, partition=decision.partition or 0, cmdline=cmd)
    if t is BootType.SYSID:
        return BootWhat(t, sysid=decision.sysid or 0, cmdline=cmd)
    if t is BootType.DISKPART:
        return BootWhat(t, disk=decision.disk or 0, partition=decision.partition or 0,
                        cmdline=cmd)
    return BootWhat(t)


def order_packet(kind: BootType | str) -> bytes:
    """An ORDER (AUTO, REBOOT or RESTART) for a waiting loader; ValueError otherwise."""
    return codec.reply(BootWhat(order_kind(kind)), opcode=Opcode.ORDER)


@dataclass(frozen=True, slots=True)
class Reply:
    data: bytes                    # the REPLY packet, sent to <ip>:client_port
    ip: str
    node: Node | None
    decision: BootDecision


class BootinfoCore:
    """Decides the reply to one datagram; counts what it saw in `counters`."""

    def __init__(self, ask: Ask, counters: Counter | None = None):
        self.ask = ask
        self.c = counters if counters is not None else Counter()

    def handle(self, data: bytes, ip: str, snap: Snapshot, server: str = "") -> Reply | None:
        """The reply to one datagram from `ip`; `server` is the address it names for
        this server (server.public_address, or the one the request arrived on)."""
        c = self.c
        c["packets"] += 1
        try:
            pkt = codec.decode(data)
        except CodecError:
            c["malformed"] += 1
            return None
        if pkt.opcode == Opcode.REQUEST:
            node = snap.by_ip.get(ip)
        elif pkt.opcode == Opcode.KEYED_REQUEST:
            try:
                node = snap.by_privkey.get(pkt.key())
            except CodecError:
                c["malformed"] += 1
                return None
            if node is None:
                c["unknown_key"] += 1
                return None
        else:
            c["ignored"] += 1  # REPLY/ORDER/ACK/INFO are not questions for us
            return None
        c["requests"] += 1
        decision = self.ask(snap, node, pkt.version)
        try:
            out = codec.reply(boot_what(decision, server), version=pkt.version)
        except CodecError as e:  # an inventory value that does not fit the wire format
            c["encode_errors"] += 1
            log.warning("bootinfo: cannot encode answer for %s (%s): %s",
                        node.node_id if node else ip, decision.image, e)
            return None
        c["replies"] += 1
        c[f"reply_{decision.type.name.lower()}"] += 1
        if node is None:
            c["unknown_nodes"] += 1
        return Reply(out, ip, node, decision)
