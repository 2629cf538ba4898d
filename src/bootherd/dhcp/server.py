"""The asyncio transport around :class:`bootherd.dhcp.engine.Engine`.

One datagram protocol per socket; each packet is decided synchronously (no await).  Replies
that grant a lease wait for the group commit of their lease row (see
:class:`bootherd.dhcp.leasewriter.LeaseWriter`); all other replies are sent at once.
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

from ..inventory.model import Snapshot
from ..udpsend import loop_sender
from .engine import Decision, Engine
from .leasewriter import Batch, LeaseWriter

log = logging.getLogger("bootherd.dhcp")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def set_buffers(sock: socket.socket, size: int) -> None:
    """Receive and send buffers of `size` where the host allows (a storm arrives at once)."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, size)
        except OSError:
            pass


def make_socket(address: str, port: int, interface: str = "", broadcast: bool = True,
                rcvbuf: int = 4 << 20) -> socket.socket:
    """A UDP socket bound to address:port (raises OSError naming the address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if broadcast:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        set_buffers(sock, rcvbuf)
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


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, server: DhcpServer, proxy_port: bool, reply_via: Any = None):
        self.server = server
        self.proxy_port = proxy_port
        self.transport: asyncio.DatagramTransport | None = None
        self.reply_via = reply_via  # protocol whose transport sends the replies
        self.fd = -1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        via = self.reply_via or self
        self.server.on_packet(data, addr, via, self.proxy_port)

    def error_received(self, exc: Exception) -> None:
        self.server.counters["socket_errors"] += 1


class DhcpServer:
    """Serves one Engine on (address, port), plus proxy_port in proxy mode."""

    def __init__(self, engine: Engine, snapshot: Callable[[], Snapshot], *, address: str,
                 port: int, writer: LeaseWriter | None, proxy_port: int | None = None,
                 interface: str = "",
                 record_state: Callable[[str], None] | None = None,
                 counters: Counter | None = None, native_send: bool = True):
        self.engine = engine
        self.snapshot = snapshot
        self.address = address
        self.port = port
        self.proxy_port = proxy_port
        self.interface = interface
        self.writer = writer
        self.record_state = record_state
        self.counters = counters if counters is not None else engine.counters
        self.protocols: list[_Proto] = []
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
        try:
            socks.append((make_socket(self.address, self.port, self.interface), False, False))
            if self.interface and self.address != "0.0.0.0":
                # Bound to a unicast address, the socket would miss broadcast DISCOVERs.
                socks.append((make_socket("255.255.255.255", self.port, self.interface),
                              False, True))
            if self.proxy_port:
                socks.append((make_socket(self.address, self.proxy_port, self.interface),
                              True, False))
        except OSError:
            for s, _, _ in socks:
                s.close()
            raise
        self.sender = loop_sender(loop) if self.native_send else None
        main: _Proto | None = None
        for sock, proxy, recv_only in socks:
            proto = _Proto(self, proxy, main if recv_only else None)
            proto.fd = sock.fileno()
            await loop.create_datagram_endpoint(lambda p=proto: p, sock=sock)
            if main is None:
                main = proto
            self.protocols.append(proto)
            self.bound.append(sock.getsockname()[:2])
        if self.writer is not None:
            self.writer.start()

    async def stop(self) -> None:
        for p in self.protocols:
            if self.sender is not None:
                self.sender.forget(p.fd)
            if p.transport is not None:
                p.transport.close()
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

    # ------------------------------------------------------------------ hot path

    def on_packet(self, data: bytes, addr: tuple[str, int], proto: _Proto, proxy: bool) -> None:
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

    def _send(self, proto: _Proto, d: Decision) -> None:
        if not d.data:
            return  # RELEASE / DECLINE: a row to commit, nothing to say
        if d.broadcast and not self.can_broadcast:
            self.counters["no_broadcast"] += 1
            return
        t = proto.transport
        if t is None or t.is_closing():
            return
        sender = self.sender
        try:
            if sender is not None:
                sender.send(proto.fd, d.data, (d.ip, d.port))
            else:
                t.sendto(d.data, (d.ip, d.port))
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
