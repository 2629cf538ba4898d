"""The asyncio transport around :class:`bootherd.dhcp.engine.Engine`.

Each socket is drained in batches (:func:`bootherd.udprecv.recv_batch`, recvmmsg) into one
:class:`bootherd.backlog.Backlog`, which is served in the order of
:mod:`bootherd.dhcp.priority` (REQUESTs before DISCOVERs, oldest first, a retransmission
once, a DISCOVER too old to be answered before the firmware's retry dropped); each packet
is decided synchronously (no await).  Replies that grant a lease wait for the group commit
of their lease row (see :class:`bootherd.dhcp.leasewriter.LeaseWriter`); all other replies
are sent at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .. import udprecv
from ..backlog import Backlog
from ..inventory.model import Snapshot
from ..udpsend import loop_sender
from . import priority
from .engine import Decision, Engine
from .leasewriter import Batch, LeaseWriter

log = logging.getLogger("bootherd.dhcp")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
RCVBUF = 32 << 20  # dhcp.rcvbuf: 10,000 DISCOVERs of a power-on second, with room to spare
RECV_BATCH = 1024  # datagrams read per readiness event (recvmmsg, 64 per call)
SERVE_BATCH = 256  # requests decided per loop iteration before the sockets are read again


def set_buffers(sock: socket.socket, rcvbuf: int, what: str) -> None:
    """A receive buffer of `rcvbuf` bytes (a storm arrives at once; udprecv.set_rcvbuf)
    and a 4 MiB send buffer where the host allows."""
    udprecv.set_rcvbuf(sock, rcvbuf, what)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    except OSError:
        pass


def make_socket(address: str, port: int, interface: str = "", broadcast: bool = True,
                rcvbuf: int = RCVBUF) -> socket.socket:
    """A UDP socket bound to address:port (raises OSError naming the address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if broadcast:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        set_buffers(sock, rcvbuf, f"dhcp {address}:{port}")
        udprecv.timestamps(sock)
        if interface:
            # Broadcast replies leave through this interface whatever the routing table says.
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode() + b"\0")
        sock.setblocking(False)
        sock.bind((address, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"dhcp: cannot bind {address}:{port}"
                      f"{' on ' + interface if interface else ''}: {e.strerror}") from None
    return sock


class _Socket:
    """One listening socket: read by a loop reader in batches, written by the sender."""

    __slots__ = ("sock", "fd", "proxy_port", "reply_via", "closed")

    def __init__(self, sock: socket.socket, proxy_port: bool, reply_via: _Socket | None):
        self.sock = sock
        self.fd = sock.fileno()
        self.proxy_port = proxy_port
        self.reply_via = reply_via or self  # the socket whose replies leave through
        self.closed = False


class DhcpServer:
    """Serves one Engine on (address, port), plus proxy_port in proxy mode."""

    def __init__(self, engine: Engine, snapshot: Callable[[], Snapshot], *, address: str,
                 port: int, writer: LeaseWriter | None, proxy_port: int | None = None,
                 interface: str = "",
                 record_state: Callable[[str], None] | None = None,
                 counters: Counter | None = None, native_send: bool = True,
                 rcvbuf: int = RCVBUF, discover_deadline: float = priority.DISCOVER_DEADLINE):
        self.engine = engine
        self.snapshot = snapshot
        self.address = address
        self.port = port
        self.proxy_port = proxy_port
        self.interface = interface
        self.writer = writer
        self.record_state = record_state
        self.counters = counters if counters is not None else engine.counters
        self.sockets: list[_Socket] = []
        self.rcvbuf = rcvbuf
        self.backlog: Backlog[tuple[bytes, tuple[str, int], _Socket]] = Backlog(
            priority.deadlines(discover_deadline))
        self._serving = False
        self.bound: list[tuple[str, int]] = []
        # Broadcasting from a socket bound to loopback without an interface would follow the
        # host's default route: never do that, unicast fallbacks only.
        self.can_broadcast = bool(interface) or address == "0.0.0.0"
        if address != "0.0.0.0" and ipaddress.IPv4Address(address).is_loopback:
            self.can_broadcast = bool(interface)
        self._pending: Batch = []
        self._inflight = False
        self._scheduled = False
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Replies go out from a native thread when the extension is built (udpsend.py).
        self.native_send = native_send
        self.sender: Any = None

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        socks: list[tuple[socket.socket, bool, bool]] = []
        rb = self.rcvbuf
        try:
            socks.append((make_socket(self.address, self.port, self.interface, rcvbuf=rb),
                          False, False))
            if self.interface and self.address != "0.0.0.0":
                # Bound to a unicast address, the socket would miss broadcast DISCOVERs.
                socks.append((make_socket("255.255.255.255", self.port, self.interface,
                                          rcvbuf=rb), False, True))
            if self.proxy_port:
                socks.append((make_socket(self.address, self.proxy_port, self.interface,
                                          rcvbuf=rb), True, False))
        except OSError:
            for s, _, _ in socks:
                s.close()
            raise
        self.sender = loop_sender(loop) if self.native_send else None
        main: _Socket | None = None
        for sock, proxy, recv_only in socks:
            entry = _Socket(sock, proxy, main if recv_only else None)
            if main is None:
                main = entry
            self.sockets.append(entry)
            self.bound.append(sock.getsockname()[:2])
            loop.add_reader(entry.fd, self._readable, entry)
        if self.writer is not None:
            self.writer.start()

    def socket_drops(self) -> int:
        """Datagrams the kernel dropped on our sockets (full receive queues)."""
        return sum(udprecv.socket_drops(s.sock) or 0 for s in self.sockets if not s.closed)

    async def stop(self) -> None:
        for s in self.sockets:
            if s.closed:
                continue
            s.closed = True
            if self.sender is not None:
                self.sender.forget(s.fd)
            if self._loop is not None:
                self._loop.remove_reader(s.fd)
            s.sock.close()
        # Let batches in flight commit (their replies go nowhere: the sockets are closed).
        if self._idle is not None and (self._inflight or self._pending):
            try:
                await asyncio.wait_for(self._idle.wait(), 30)
            except TimeoutError:
                log.warning("dhcp: lease commits still pending at stop")
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        if self.sender is not None:
            self.sender.close()

    # ------------------------------------------------------------------ receive path

    def _readable(self, entry: _Socket) -> None:
        """Drain what the socket holds into the backlog; serving comes after."""
        if entry.closed:
            return
        try:
            batch = udprecv.recv_batch(entry.sock, RECV_BATCH)
        except OSError:
            self.counters["socket_errors"] += 1
            return
        now = time.time()
        add = self.backlog.add
        classify = priority.classify
        for data, addr, ts in batch:
            key, cls = classify(data, addr)
            add((data, addr, entry), key, cls, ts or now)
        if batch and not self._serving:
            self._serving = True
            assert self._loop is not None
            self._loop.call_soon(self._serve)

    def _serve(self) -> None:
        """Decide up to SERVE_BATCH waiting requests, most urgent first; the rest wait for
        the next loop iteration, after the sockets were read again (a REQUEST that came
        meanwhile goes before the DISCOVERs still waiting)."""
        bl = self.backlog
        for data, addr, entry in bl.take(time.time(), SERVE_BATCH):
            if not entry.closed:
                self.on_packet(data, addr, entry.reply_via, entry.proxy_port)
        c, bc = self.counters, bl.counters
        c["duplicates_queued"] = bc.duplicates  # retransmissions of a request still waiting
        c["stale_discover"] = bc.expired  # DISCOVERs too old to answer before the retry
        c["backlog_overflow"] = bc.overflow
        if len(bl):
            assert self._loop is not None
            self._loop.call_soon(self._serve)
        else:
            self._serving = False

    # ------------------------------------------------------------------ hot path

    def on_packet(self, data: bytes, addr: tuple[str, int], proto: _Socket, proxy: bool) -> None:
        try:
            d = self.engine.handle(data, addr[0], addr[1], time.time(), self.snapshot(), proxy)
        except Exception:  # noqa: BLE001 - one bad packet must never stop the server
            self.counters["errors"] += 1
            log.exception("dhcp: request handling failed")
            return
        if d is None:
            return
        if d.log is not None:
            log.warning("dhcp: %s", d.log)
            return
        if d.event_node is not None and self.record_state is not None:
            try:
                self.record_state(d.event_node)
            except Exception:  # noqa: BLE001
                log.exception("dhcp: recording a state event failed")
        if d.lease is not None and self.writer is not None:
            self._pending.append((d.lease, (proto, d)))
            if not self._inflight and not self._scheduled:
                self._scheduled = True
                assert self._loop is not None
                # Gather everything that arrives in this loop iteration into one commit.
                self._loop.call_soon(self._kick)
            return
        self._send(proto, d)

    def _send(self, proto: _Socket, d: Decision) -> None:
        if not d.data:
            return  # RELEASE / DECLINE: a row to commit, nothing to say
        if d.broadcast and not self.can_broadcast:
            self.counters["no_broadcast"] += 1
            return
        if proto.closed:
            return
        sender = self.sender
        try:
            if sender is not None:
                sender.send(proto.fd, d.data, (d.ip, d.port))
            else:
                proto.sock.sendto(d.data, (d.ip, d.port))
            self.counters["replies"] += 1
        except OSError:
            self.counters["send_errors"] += 1

    def _kick(self) -> None:
        self._scheduled = False
        if self._inflight or not self._pending:
            return
        batch, self._pending = self._pending, []
        self._inflight = True
        assert self._idle is not None and self.writer is not None and self._loop is not None
        self._idle.clear()
        loop = self._loop
        self.writer.submit(batch, lambda b: loop.call_soon_threadsafe(self._committed, b))

    def _committed(self, batch: Batch) -> None:
        self._inflight = False
        send = self._send
        for _row, (proto, d) in batch:
            send(proto, d)
        self.counters["lease_commits"] += 1
        if self._pending:
            self._kick()
        else:
            assert self._idle is not None
            self._idle.set()
