"""The asyncio transport around :class:`bootherd.dhcp6.engine.Engine6`, and the service.

Clients on the link send to ff02::1:2 (All_DHCP_Relay_Agents_and_Servers) from their
link-local address; relays and renewing clients send unicast.  With `dhcp6.interface`
set the server joins the group on it (a second socket bound to the group when the main
one is bound to a unicast address).  A REPLY that grants an address is sent once its
lease row has committed (the v4 server's group commit, `dhcp.leasewriter`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from .. import udprecv
from ..dhcp.engine import Decision
from ..dhcp.leases import LeaseTable
from ..dhcp.leasewriter import Batch, LeaseWriter, load_leases
from ..dhcp.server import SO_BINDTODEVICE, set_buffers
from ..inventory.model import Snapshot
from ..logs import RateLimited, event
from ..policy import dhcp6_boot
from .codec import ALL_SERVERS, MsgType
from .engine import Engine6, Settings6

log = logging.getLogger("bootherd.dhcp6")

# Message type names by value, for log lines.
MESSAGE_TYPES = {v: k for k, v in vars(MsgType).items() if k.isupper()}
# Counters that name the kind of message (the others say what became of it).
_KINDS = frozenset({"solicit", "request", "confirm", "renew", "rebind", "release", "decline",
                    "information_request", "reply", "lease_commits"})


def log_request(counters: Counter, before: dict[str, int], data: bytes, src: str,
                d: Decision | None) -> None:
    """One line for one message: who sent it, its type, and what became of it (the
    counters the engine moved: reply, ignored for an unknown client, refused_arch, ...)."""
    outcome = sorted(k for k, v in counters.items() if v != before.get(k, 0) and k not in _KINDS)
    mtype = MESSAGE_TYPES.get(data[0], str(data[0])) if data else ""
    event(log, logging.INFO, "dhcp6 request", remote=src, type=mtype,
          node=(d.event_node or "") if d else "", outcome=",".join(outcome) or "none",
          reply=bool(d and d.data))

def make_socket6(address: str, port: int, interface: str = "", group: bool = False,
                 rcvbuf: int = 4 << 20) -> socket.socket:
    """A UDP/IPv6 socket on address:port; `group`: bound to ff02::1:2 on `interface`."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        set_buffers(sock, rcvbuf, f"dhcp6 {ALL_SERVERS if group else address}:{port}")
        index = socket.if_nametoindex(interface) if interface else 0
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode() + b"\0")
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        if group:
            sock.bind((ALL_SERVERS, port, 0, index))
        else:
            sock.bind((address, port, 0, index if address.startswith("fe80") else 0))
        if interface and (group or address == "::"):
            mreq = socket.inet_pton(socket.AF_INET6, ALL_SERVERS) + struct.pack("@I", index)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"dhcp6: cannot bind {ALL_SERVERS if group else address}:{port}"
                      f"{' on ' + interface if interface else ''}: {e.strerror}") from None
    return sock


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, server: Dhcp6Server, reply_via: _Proto | None = None):
        self.server = server
        self.reply_via = reply_via
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.server.on_packet(data, addr, self.reply_via or self)

    def error_received(self, exc: Exception) -> None:
        self.server.counters["socket_errors"] += 1


class Dhcp6Server:
    def __init__(self, engine: Engine6, snapshot: Callable[[], Snapshot], *, address: str,
                 port: int, interface: str = "", writer: LeaseWriter | None = None,
                 record_state: Callable[[str], None] | None = None,
                 counters: Counter | None = None, rcvbuf: int = 4 << 20,
                 log_requests: bool = False, bad_input_interval: float = 60.0):
        self.engine = engine
        self.rcvbuf = rcvbuf
        # One info line per message (log.requests = ["dhcp6"]); bad input at most one
        # line per interval per source (it is counted either way).
        self.log_requests = log_requests
        self.bad_input = RateLimited(log, bad_input_interval)
        self.snapshot = snapshot
        self.address, self.port, self.interface = address, port, interface
        self.writer = writer
        self.record_state = record_state
        self.counters = counters if counters is not None else engine.counters
        self.protocols: list[_Proto] = []
        self.bound: list[tuple[str, int]] = []
        self._pending: Batch = []
        self._inflight = False
        self._idle = asyncio.Event()  # set whenever nothing waits for a commit
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        socks = [make_socket6(self.address, self.port, self.interface, rcvbuf=self.rcvbuf)]
        try:
            if self.interface and self.address != "::":
                socks.append(make_socket6(self.address, self.port, self.interface, group=True,
                                          rcvbuf=self.rcvbuf))
        except OSError:
            socks[0].close()
            raise
        main: _Proto | None = None
        for sock in socks:
            proto = _Proto(self, main)
            await loop.create_datagram_endpoint(lambda p=proto: p, sock=sock)
            main = main or proto
            self.protocols.append(proto)
            self.bound.append(sock.getsockname()[:2])
        if self.writer is not None:
            self.writer.start()

    def socket_drops(self) -> int:
        """Datagrams the kernel dropped at this server's sockets since they opened."""
        return sum(udprecv.socket_drops(p.transport.get_extra_info("socket")) or 0
                   for p in self.protocols if p.transport is not None
                   and not p.transport.is_closing())

    async def stop(self) -> None:
        for p in self.protocols:
            if p.transport is not None:
                p.transport.close()
        if self._inflight or self._pending:  # let commits in flight finish (replies go nowhere)
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), 30)
            except TimeoutError:
                log.warning("dhcp6: lease commits still pending at stop")
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)

    def on_packet(self, data: bytes, addr: tuple, proto: _Proto) -> None:
        src = addr[0].split("%", 1)[0]
        c = self.counters
        before = dict(c) if self.log_requests else None
        malformed = c["malformed"]
        try:
            d = self.engine.handle(data, src, addr[1], time.time(), self.snapshot())
        except Exception:  # noqa: BLE001 - one bad packet must never stop the server
            c["errors"] += 1
            self.bad_input((src, "failed"), "dhcp6 request handling failed", exc_info=True,
                           remote=src)
            return
        if c["malformed"] != malformed:
            self.bad_input((src, "malformed"), "dhcp6 bad input", what="malformed", remote=src,
                           bytes=len(data))
        if before is not None:
            log_request(c, before, data, src, d)
        if d is None:
            return
        if d.log is not None:
            # The engine already holds a refused client to one line per interval.
            event(log, logging.WARNING, "dhcp6 refused", reason=d.log, remote=src)
            return
        # Replies go back where the message came from, with its scope (link-local).
        dest = (d.ip, d.port, 0, addr[3] if len(addr) > 3 else 0)
        if d.lease is not None and self.writer is not None:
            self._pending.append((d.lease, (proto, d, dest)))
            if not self._inflight:
                assert self._loop is not None
                self._loop.call_soon(self._kick)
            return
        self._send(proto, d, dest)

    def _send(self, proto: _Proto, d: Decision, dest: tuple) -> None:
        if d.event_node is not None and self.record_state is not None:
            try:
                self.record_state(d.event_node)
            except Exception:  # noqa: BLE001
                log.exception("dhcp6: recording a state event failed")
        if not d.data or proto.transport is None or proto.transport.is_closing():
            return
        try:
            proto.transport.sendto(d.data, dest)
            self.counters["replies"] += 1
        except OSError:
            self.counters["send_errors"] += 1

    def _kick(self) -> None:
        if self._inflight or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._inflight = True
        loop = self._loop
        assert loop is not None and self.writer is not None
        self.writer.submit(batch, lambda b: loop.call_soon_threadsafe(self._committed, b))

    def _committed(self, batch: Batch) -> None:
        self._inflight = False
        for _row, (proto, d, dest) in batch:
            self._send(proto, d, dest)
        self.counters["lease_commits"] += 1
        if self._pending:
            self._kick()
        else:
            self._idle.set()


class Dhcp6Service:
    name = "dhcp6"

    def __init__(self, ctx: Any, lifecycle: Any):
        self.ctx = ctx
        cfg = ctx.config
        d = cfg.dhcp6
        self.counters = ctx.metrics.protocol("dhcp6")
        self.leases = LeaseTable()
        self.engine = Engine6(Settings6.from_config(cfg, ctx.server_name),
                              partial(dhcp6_boot, cfg=cfg), self.leases, self.counters)
        self.writer = LeaseWriter(ctx.live.engine)
        live = ctx.live
        self.server = Dhcp6Server(
            self.engine, lambda: live.snapshot, address=d.address, port=d.port,
            interface=d.interface, writer=self.writer,
            record_state=lifecycle.dhcp_acked,  # the coordinator records PXEBOOTING
            counters=self.counters, rcvbuf=d.rcvbuf, log_requests="dhcp6" in cfg.log.requests,
            bad_input_interval=cfg.log.bad_input_interval)
        ctx.metrics.gauge("dhcp6_leases", lambda: len(self.leases.by_ip))
        ctx.metrics.count("dhcp6", "lease_batches", lambda: self.writer.batches)
        ctx.metrics.count("dhcp6", "lease_conflicts", lambda: self.writer.conflicts)
        # What the kernel dropped on our sockets (a full receive queue: raise dhcp6.rcvbuf);
        # it only grows, so an event as DHCP's.
        ctx.metrics.count("dhcp6", "socket_drops", self.server.socket_drops)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.writer.on_down = lambda down: loop.call_soon_threadsafe(
            setattr, self.engine, "pool_grants", not down)
        # Another server claimed the pool address first: no REPLY, the client asks again.
        self.writer.on_conflict = lambda row, token, holder: loop.call_soon_threadsafe(
            self.engine.lost_claim, row)
        rows = await asyncio.to_thread(load_leases, self.ctx.live.engine)
        # IPv6 leases only, keyed by the client (DUID/IAID) as the engine keys them.
        self.leases.load(_Row(r) for r in rows if ":" in r.ip and r.client_id)
        await self.server.start()
        event(log, logging.INFO, "dhcp6 listening",
              address=[f"[{a}]:{p}" for a, p in self.server.bound],
              group=ALL_SERVERS if self.server.interface else "",
              interface=self.server.interface, leases=len(self.leases.by_ip))

    async def stop(self) -> None:
        await self.server.stop()


class _Row:
    """A leases row seen with the client key (client_id) in place of the MAC."""

    def __init__(self, row: Any):
        self.ip, self.mac, self.state = row.ip, row.client_id, row.state
        self.expires, self.node_id, self.client_id = row.expires, row.node_id, row.client_id
