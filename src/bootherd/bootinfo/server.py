"""bootinfo UDP transport: a thin asyncio shell around `core.BootinfoCore`.

- listens on (bootinfo.address, bootinfo.port); replies go to
  <client IP>:bootinfo.client_port from the listening socket;
- orders (wake a waiting loader) go from a second socket bound to
  bootinfo.order_port with SO_REUSEPORT (`OrderSocket`, the lifecycle's order
  sender), so `bootherd node wake` in another process can bind the same port
  and send from it too when no server runs;
- malformed packets are counted (metrics "bootinfo"/"malformed") and dropped;
- the listening socket is drained in batches (:func:`bootherd.udprecv.recv_batch`,
  recvmmsg), not one datagram per loop wake-up: in a storm thousands of loaders ask
  within a second, and a socket read 32 datagrams a wake-up (libuv's datagram reader)
  on a busy event loop answered them after the loader's first 1 s timeout.  What was
  read waits in a :class:`bootherd.backlog.Backlog`: oldest first (the kernel's receive
  time), and a loader's retransmission of a question still waiting is answered once
  (``duplicates_queued``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .. import udprecv
from ..backlog import Backlog
from ..boottype import BootType
from ..inventory.model import Snapshot
from ..logs import RateLimited, event
from ..netaddr import local_address
from .core import BootinfoCore, order_packet

log = logging.getLogger("bootherd.bootinfo")

RECV_BATCH = 1024  # datagrams read per readiness event (recvmmsg, 64 per call)
SERVE_BATCH = 512  # questions answered per loop iteration before the socket is read again


def bind_order_socket(address: str, port: int) -> socket.socket:
    """A UDP socket for orders, shareable between processes of one user."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class _Answerer:
    """Answers one datagram through `on_packet`: a failure is counted and logged, never
    raised (one bad packet must never stop the server); bad input and, with
    log.requests, each question get a log line."""

    def __init__(self, on_packet: Callable[[bytes, tuple], None], counters: Counter,
                 log_requests: bool = False, bad_input_interval: float = 60.0,
                 snapshot: Callable[[], Snapshot] | None = None):
        self.on_packet = on_packet
        self.c = counters
        # One info line per question (log.requests = ["bootinfo"]); off, one test.
        self.log_requests = log_requests and snapshot is not None
        self.snapshot = snapshot
        self.bad_input = RateLimited(log, bad_input_interval)

    def __call__(self, data: bytes, addr: tuple) -> None:
        c = self.c
        before = dict(c) if self.log_requests else None
        malformed, unknown = c["malformed"], c["unknown_key"]
        try:
            self.on_packet(data, addr)
        except Exception:  # one bad packet must never stop the server
            c["errors"] += 1
            self.bad_input(addr[0], "bootinfo packet failed", exc_info=True, remote=addr[0])
        if c["malformed"] != malformed or c["unknown_key"] != unknown:
            self.bad_input(addr[0], "bootinfo bad input", remote=addr[0], bytes=len(data),
                           what="malformed" if c["malformed"] != malformed else "unknown_key")
        if before is not None and self.snapshot is not None:
            moved = sorted(k for k, v in c.items() if v != before.get(k, 0)
                           and k not in ("packets", "requests", "replies"))
            node = self.snapshot().by_ip.get(addr[0])
            event(log, logging.INFO, "bootinfo request", remote=addr[0],
                  node=node.node_id if node else "", outcome=",".join(moved) or "none")


class _Proto(asyncio.DatagramProtocol):
    """The order socket's datagrams (rare: loaders ask on the listening port)."""

    def __init__(self, answer: Callable[[bytes, tuple], None], counters: Counter):
        self.datagram_received = answer  # type: ignore[method-assign]
        self.c = counters

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a loader that went away: not our problem.
        self.c["send_errors"] += 1


class OrderSocket:
    """Sends ORDERs from bootinfo.order_port (loaders accept orders from it only).

    Datagrams arriving on it are questions like any other (`on_packet`)."""

    def __init__(self, cfg: Any, counters: Counter):
        self.cfg = cfg  # the bootinfo section
        self.c = counters
        self.transport: asyncio.DatagramTransport | None = None

    @property
    def running(self) -> bool:
        return self.transport is not None

    async def start(self, on_packet: Callable[[bytes, tuple], None]) -> None:
        try:
            sock = bind_order_socket(self.cfg.address, self.cfg.order_port)
        except OSError as e:
            raise OSError(e.errno, f"bootinfo orders {self.cfg.address}:{self.cfg.order_port}: "
                                   f"{e.strerror}") from None
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            lambda: _Proto(_Answerer(on_packet, self.c), self.c), sock=sock)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def send(self, ip: str, kind: BootType) -> str:
        if self.transport is None:
            raise OSError("bootinfo server is not running")
        dest = (ip, self.cfg.client_port)
        self.transport.sendto(order_packet(kind), dest)
        self.c["orders"] += 1
        return f"sent {BootType(kind).name} order to {dest[0]}:{dest[1]}"


class BootinfoServer:
    """The listening socket and the order socket around one core."""

    def __init__(self, cfg: Any, core: BootinfoCore, snapshot: Callable[[], Snapshot],
                 orders: OrderSocket, public_address: str = "", log_requests: bool = False,
                 bad_input_interval: float = 60.0):
        self.cfg = cfg  # the bootinfo section
        self.public_address = public_address  # "": advertise the address asked on
        self.core = core
        self.snapshot = snapshot
        self.orders = orders
        self.counters = core.c
        self.answer = _Answerer(self.handle, self.counters, log_requests, bad_input_interval,
                                snapshot)
        self.sock: socket.socket | None = None
        # (datagram, source) by (source, datagram): a retransmission waits once
        self.backlog: Backlog[tuple[bytes, tuple]] = Backlog([None])
        self._serving = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        bi = self.cfg
        loop = self._loop = asyncio.get_running_loop()
        # Bound here, not by create_datagram_endpoint(local_addr=...): uvloop's error
        # for that loses the errno (and with it the reason).
        sock = socket.socket(socket.AF_INET6 if ":" in bi.address else socket.AF_INET,
                             socket.SOCK_DGRAM)
        try:
            sock.bind((bi.address, bi.port))
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f"cannot bind {bi.address}:{bi.port}: {e.strerror}") \
                from None
        sock.setblocking(False)
        # A boot storm's loaders ask at once; the default 208 KiB overflows.
        udprecv.set_rcvbuf(sock, bi.rcvbuf, f"bootinfo {bi.address}:{bi.port}")
        try:  # ... and their answers leave at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        except OSError:
            pass
        udprecv.timestamps(sock)
        self.sock = sock
        loop.add_reader(sock.fileno(), self._readable)
        try:
            await self.orders.start(self.handle)
        except OSError:
            self._close()
            raise
        event(log, logging.INFO, "bootinfo listening", address=f"{bi.address}:{self.port}",
              order_port=bi.order_port)

    def _close(self) -> None:
        if self.sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    async def stop(self) -> None:
        self._close()
        self.orders.stop()

    def socket_drops(self) -> int:
        """Datagrams the kernel dropped at the listening socket (its queue was full)."""
        if self.sock is None:
            return 0
        return udprecv.socket_drops(self.sock) or 0

    @property
    def port(self) -> int:
        assert self.sock is not None
        return self.sock.getsockname()[1]

    def _readable(self) -> None:
        """Drain what the socket holds into the backlog; answering comes after."""
        if self.sock is None:
            return
        try:
            batch = udprecv.recv_batch(self.sock, RECV_BATCH)
        except OSError:
            self.counters["socket_errors"] += 1
            return
        now = time.time()
        add = self.backlog.add
        for data, addr, ts in batch:
            add((data, addr), (addr[0], data), 0, ts or now)
        if batch and not self._serving:
            self._serving = True
            assert self._loop is not None
            self._loop.call_soon(self._serve)

    def _serve(self) -> None:
        """Answer up to SERVE_BATCH waiting questions, oldest first; the rest wait for the
        next loop iteration, after the socket was read again."""
        bl = self.backlog
        answer = self.answer
        for data, addr in bl.take(time.time(), SERVE_BATCH):
            answer(data, addr)
        self.counters["duplicates_queued"] = bl.counters.duplicates
        if len(bl) and self.sock is not None:
            assert self._loop is not None
            self._loop.call_soon(self._serve)
        else:
            self._serving = False

    def handle(self, data: bytes, addr: tuple) -> None:
        here = self.public_address or local_address(self.cfg.address, addr[0])
        out = self.core.handle(data, addr[0], self.snapshot(), here)
        if out is None or self.sock is None:
            return
        try:
            self.sock.sendto(out.data, (out.ip, self.cfg.client_port))
        except OSError:  # a full send queue, or a loader's address unreachable
            self.counters["send_errors"] += 1
