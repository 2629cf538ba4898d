"""Datagram plumbing for virtual nodes: mailboxes and injected packet loss.

Every UDP socket of a virtual node is an `Endpoint`: received datagrams go to
a queue the node's coroutine awaits with its firmware timeout.  Loss is
injected on both directions here, so every protocol sees the same loss.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections import deque

from ..udprecv import set_rcvbuf


class Loss:
    """Drops a fraction of datagrams at random, in both directions."""

    def __init__(self, fraction: float = 0.0, seed: int | None = None):
        self.fraction = fraction
        self.rng = random.Random(seed)
        self.dropped_out = 0
        self.dropped_in = 0

    def drop_out(self) -> bool:
        if self.fraction and self.rng.random() < self.fraction:
            self.dropped_out += 1
            return True
        return False

    def drop_in(self) -> bool:
        if self.fraction and self.rng.random() < self.fraction:
            self.dropped_in += 1
            return True
        return False


class Endpoint(asyncio.DatagramProtocol):
    """One UDP socket with a receive mailbox; `recv(timeout)` returns None on timeout."""

    def __init__(self, loss: Loss):
        self.loss = loss
        self.transport: asyncio.DatagramTransport | None = None
        self.box: deque[tuple[bytes, tuple]] = deque()
        self.waiter: asyncio.Future | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if self.loss.drop_in():
            return
        self.box.append((data, addr))
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable etc.: the firmware just times out

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def send(self, data: bytes, addr: tuple) -> None:
        if self.loss.drop_out() or self.transport is None or self.closed:
            return
        self.transport.sendto(data, addr)

    async def recv(self, timeout: float) -> tuple[bytes, tuple] | None:
        if self.box:
            return self.box.popleft()
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        handle = loop.call_later(timeout, _wake, self.waiter)
        try:
            await self.waiter
        finally:
            handle.cancel()
            self.waiter = None
        return self.box.popleft() if self.box else None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


async def open_udp(loss: Loss, host: str, port: int = 0, reuse: bool = False,
                   rcvbuf: int = 0) -> Endpoint:
    """A bound UDP endpoint; raises OSError naming the address when it cannot bind."""
    loop = asyncio.get_running_loop()
    sock = socket_for(host, socket.SOCK_DGRAM)
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            # Past net.core.rmem_max when root (SO_RCVBUFFORCE), else warned about: a
            # simulator socket that overflows drops the server's answers and shows as
            # the server's retries.
            set_rcvbuf(sock, rcvbuf, f"storm socket {host}:{port}")
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot bind {host}:{port}: {e.strerror}") from None
    sock.setblocking(False)
    _, proto = await loop.create_datagram_endpoint(lambda: Endpoint(loss), sock=sock)
    return proto  # type: ignore[return-value]


IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)


def socket_for(host: str, kind: int) -> socket.socket:
    """A socket of `host`'s family.  An IPv6 one may bind an address no interface holds
    (IPV6_FREEBIND): a storm's nodes are the addresses of a prefix routed to lo
    (`ip -6 route add local PREFIX dev lo`), which IPv6, unlike IPv4, only lets a
    socket bind with this option."""
    if ":" not in host:
        return socket.socket(socket.AF_INET, kind)
    sock = socket.socket(socket.AF_INET6, kind)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    except OSError:
        pass  # an older kernel: addresses on an interface still bind
    return sock
