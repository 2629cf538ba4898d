"""The asyncio transport around :class:`bootherd.dhcp.engine.Engine`.

Each socket is drained in batches (:func:`bootherd.udprecv.recv_batch`, recvmmsg) into one
:class:`bootherd.backlog.Backlog`, which is served in the order of
:mod:`bootherd.dhcp.priority` (REQUESTs before DISCOVERs, oldest first, a retransmission
once, a DISCOVER too old to be answered before the firmware's retry dropped); each packet
is decided synchronously (no await).  Replies that grant a pool address wait for the group
commit of their lease row (see :class:`bootherd.dhcp.leasewriter.LeaseWriter`); all other
replies, an inventory node's ACK included, are sent at once (its row is committed after).

A wildcard socket (dhcp.address 0.0.0.0) reads each request with the address and
interface it arrived on (IP_PKTINFO): the reply advertises that address, and a broadcast
reply leaves through that interface whatever the routing table says.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from .. import udprecv
from ..backlog import Backlog
from ..inventory.model import Snapshot
from ..logs import RateLimited, event
from ..udpsend import loop_sender
from . import priority
from .engine import Decision, Engine
from .leasewriter import Batch, LeaseWriter, safe_without_db

log = logging.getLogger("bootherd.dhcp")

SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
RCVBUF = 32 << 20  # dhcp.rcvbuf: 10,000 DISCOVERs of a power-on second, with room to spare
RECV_BATCH = 1024  # datagrams read per readiness event (recvmmsg, 64 per call)
SERVE_BATCH = 256  # requests decided per loop iteration before the sockets are read again
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_PKTINFO = struct.Struct("=i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
WILDCARD = "0.0.0.0"
ERROR_LOG_INTERVAL = 10.0  # seconds between two log lines about failing sends


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
    """A UDP socket bound to address:port (raises OSError naming the address).

    No SO_REUSEADDR: on Linux it lets a second UDP socket bind the same address and
    port, so a second DHCP server would start beside the first and share its
    packets.  A wildcard socket asks for IP_PKTINFO: each request then says which
    address and interface it arrived on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if address == WILDCARD:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
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
        raise OSError(e.errno, f"cannot bind {address}:{port}"
                      f"{' on ' + interface if interface else ''}: {e.strerror}") from None
    return sock


# Message types by option 53 value, for log lines.
MESSAGE_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK",
                 7: "RELEASE", 8: "INFORM"}
# Counters that name what became of a request (the others count message kinds or I/O).
_KINDS = frozenset({"discover", "request", "release", "decline", "inform", "bootp",
                    "replies", "lease_commits"})


def log_request(counters: Counter, before: dict[str, int], data: bytes,
                addr: tuple[str, int], d: Decision | None, snap: Snapshot) -> None:
    """One line for one request: who asked, what, and what became of it (the counters
    the engine moved say it: offer, ack, nak, ignored for an unknown MAC, ...)."""
    from .codec import decode

    outcome = sorted(k for k, v in counters.items() if v != before.get(k, 0) and k not in _KINDS)
    mac = mtype = ""
    try:
        msg = decode(data)
        mac = msg.mac.hex(":")
        mt = msg.options.get(53)
        mtype = MESSAGE_TYPES.get(mt[0], str(mt[0])) if mt and len(mt) == 1 else "BOOTP"
    except Exception:  # noqa: BLE001 - a malformed packet: logged as such
        pass
    node = snap.by_mac.get(mac) if mac else None
    event(log, logging.INFO, "dhcp request", remote=addr[0], port=addr[1], type=mtype,
          mac=mac, node=node.node_id if node else "", known=node is not None,
          outcome=",".join(outcome) or "none", reply=bool(d and d.data),
          to=f"{d.ip}:{d.port}" if d and d.data else "")


class _Socket:
    """One listening socket: read by a loop reader in batches, written by the sender."""

    __slots__ = ("sock", "fd", "proxy_port", "reply_via", "closed", "local", "wildcard")

    def __init__(self, sock: socket.socket, proxy_port: bool, reply_via: _Socket | None,
                 local: str):
        self.sock = sock
        self.fd = sock.fileno()
        self.proxy_port = proxy_port
        self.reply_via = reply_via or self  # the socket whose replies leave through
        self.closed = False
        self.wildcard = local == WILDCARD  # read with IP_PKTINFO, replies by sendmsg
        self.local = "" if self.wildcard else local  # the address requests arrive on


class _Via:
    """Where one reply goes out: the wildcard socket a request arrived on, and the
    interface and local address it arrived on (sent back as IP_PKTINFO, so a broadcast
    reply leaves through that interface whatever the routing table says, from the
    address the client spoke to)."""

    __slots__ = ("entry", "pktinfo")

    def __init__(self, entry: _Socket, pktinfo: bytes):
        self.entry = entry
        self.pktinfo = pktinfo


class DhcpServer:
    """Serves one Engine on (address, port), plus proxy_port in proxy mode."""

    def __init__(self, engine: Engine, snapshot: Callable[[], Snapshot], *, address: str,
                 port: int, writer: LeaseWriter | None, proxy_port: int | None = None,
                 interface: str = "",
                 record_state: Callable[[str], None] | None = None,
                 counters: Counter | None = None, native_send: bool = True,
                 rcvbuf: int = RCVBUF, discover_deadline: float = priority.DISCOVER_DEADLINE,
                 log_requests: bool = False, bad_input_interval: float = 60.0):
        self.engine = engine
        # One info line per request (log.requests = ["dhcp"]); off, the hot path pays
        # one attribute test.
        self.log_requests = log_requests
        self.bad_input = RateLimited(log, bad_input_interval)
        self._src = ""
        engine.on_bad_input = self._bad_packet
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
        # (datagram, source, socket, its IP_PKTINFO on a wildcard socket else None)
        self.backlog: Backlog[tuple[bytes, tuple[str, int], _Socket, bytes | None]] = Backlog(
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
        self._errors_seen = 0  # native send errors already reported
        self._error_logged = -1e9
        self._error_task: asyncio.Task | None = None

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
            # The 255.255.255.255 socket's requests are answered by the main socket, from
            # this server's address.
            local = self.address if recv_only else sock.getsockname()[0]
            entry = _Socket(sock, proxy, main if recv_only else None, local)
            if main is None:
                main = entry
            self.sockets.append(entry)
            self.bound.append(sock.getsockname()[:2])
            loop.add_reader(entry.fd, self._readable, entry)
        if self.writer is not None:
            self.writer.start()
        if self.sender is not None:
            self._error_task = loop.create_task(self._watch_native_errors())

    async def flushed(self) -> None:
        """Return once every lease row decided so far is committed (an inventory node's
        ACK goes before its row: a reader of the table waits here first)."""
        while self._pending or self._inflight or self._scheduled:
            assert self._idle is not None
            if self._inflight:
                await self._idle.wait()
            else:
                await asyncio.sleep(0)

    def socket_drops(self) -> int:
        """Datagrams the kernel dropped on our sockets (full receive queues)."""
        return sum(udprecv.socket_drops(s.sock) or 0 for s in self.sockets if not s.closed)

    async def stop(self) -> None:
        if self._error_task is not None:
            self._error_task.cancel()
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
            batch = udprecv.recv_batch(entry.sock, RECV_BATCH, pktinfo=True)
        except OSError:
            self.counters["socket_errors"] += 1
            return
        now = time.time()
        add = self.backlog.add
        classify = priority.classify
        for data, addr, ts, info in batch:
            key, cls = classify(data, addr)
            add((data, addr, entry, info), key, cls, ts or now)
        if batch and not self._serving:
            self._serving = True
            assert self._loop is not None
            self._loop.call_soon(self._serve)

    def _serve(self) -> None:
        """Decide up to SERVE_BATCH waiting requests, most urgent first; the rest wait for
        the next loop iteration, after the sockets were read again (a REQUEST that came
        meanwhile goes before the DISCOVERs still waiting)."""
        bl = self.backlog
        for data, addr, entry, info in bl.take(time.time(), SERVE_BATCH):
            if not entry.closed:
                self.on_packet(data, addr, entry.reply_via, entry.proxy_port, info)
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

    def on_packet(self, data: bytes, addr: tuple[str, int], entry: _Socket, proxy: bool,
                  pktinfo: bytes | None = None) -> None:
        """Decide one request; `pktinfo` is the in_pktinfo a wildcard socket read with it."""
        proto: _Socket | _Via = entry
        local = entry.local
        if pktinfo is not None and len(pktinfo) >= 12:
            ifindex, spec_dst, _dst = _PKTINFO.unpack_from(pktinfo)
            local = socket.inet_ntoa(spec_dst)
            proto = _Via(entry, _PKTINFO.pack(ifindex, spec_dst, b"\0\0\0\0"))
        self._src = addr[0]
        if self.log_requests:
            before = dict(self.counters)
            d = self._decide(data, addr, proxy, local)
            log_request(self.counters, before, data, addr, d, self.snapshot())
        else:
            d = self._decide(data, addr, proxy, local)
        if d is None:
            return
        if d.log is not None:
            # The engine already holds a refused client to one line per interval.
            event(log, logging.WARNING, "dhcp refused", reason=d.log, remote=addr[0])
            return
        if d.event_node is not None and self.record_state is not None:
            try:
                self.record_state(d.event_node)
            except Exception:  # noqa: BLE001
                log.exception("dhcp: recording a state event failed")
        if d.lease is not None and self.writer is not None:
            token: tuple[_Socket | _Via, Decision] | None = (proto, d)
            if safe_without_db(d.lease):
                # An inventory node's address is the inventory's, not the lease row's: any
                # server gives the same one after a crash, so its ACK need not wait for the
                # commit (a storm's ACKs queued behind ~0.5 s commits, the loader retried).
                self._send(proto, d)
                token = None
            self._pending.append((d.lease, token))
            if not self._inflight and not self._scheduled:
                self._scheduled = True
                assert self._loop is not None
                # Gather everything that arrives in this loop iteration into one commit.
                self._loop.call_soon(self._kick)
            return
        self._send(proto, d)

    def _decide(self, data: bytes, addr: tuple[str, int], proxy: bool,
                local: str) -> Decision | None:
        try:
            return self.engine.handle(data, addr[0], addr[1], time.time(), self.snapshot(), proxy,
                                      local)
        except Exception:  # noqa: BLE001 - one bad packet must never stop the server
            self.counters["errors"] += 1
            self.bad_input(addr[0], "dhcp request handling failed", exc_info=True,
                           remote=addr[0])
            return None

    def _bad_packet(self, what: str, mac: str) -> None:
        self.bad_input(self._src, "dhcp bad input", what=what, remote=self._src,
                       mac=mac or None)

    def _send(self, proto: _Socket | _Via, d: Decision) -> None:
        if not d.data:
            return  # RELEASE / DECLINE: a row to commit, nothing to say
        if d.broadcast and not self.can_broadcast:
            self.counters["no_broadcast"] += 1
            if self._may_log():
                log.warning("dhcp: a broadcast reply cannot leave %s without dhcp.interface "
                            "(counted as no_broadcast: %d)", self.address,
                            self.counters["no_broadcast"])
            return
        if isinstance(proto, _Via):
            self._send_via(proto, d)
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
        except OSError as e:
            self._send_failed(e.errno, d)

    def _send_via(self, via: _Via, d: Decision) -> None:
        entry = via.entry
        if entry.closed:
            return
        # A broadcast leaves through the interface the request came in on; a unicast
        # reply (relay, renewing client) keeps only the source address and follows the
        # routes (with an interface named, Linux takes any address as on-link).
        info = via.pktinfo if d.broadcast else b"\0\0\0\0" + via.pktinfo[4:]
        try:
            entry.sock.sendmsg([d.data], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0,
                               (d.ip, d.port))
            self.counters["replies"] += 1
        except OSError as e:
            self._send_failed(e.errno, d)

    def _may_log(self) -> bool:
        """At most one log line about unsent replies per ERROR_LOG_INTERVAL."""
        now = time.monotonic()
        if now - self._error_logged < ERROR_LOG_INTERVAL:
            return False
        self._error_logged = now
        return True

    def _send_failed(self, err: int | None, d: Decision) -> None:
        """Counted, and logged at most once per ERROR_LOG_INTERVAL: never silent."""
        self.counters["send_errors"] += 1
        if self._may_log():
            log.warning("dhcp: cannot send a reply to %s:%d: %s (%d send errors so far)",
                        d.ip, d.port, os.strerror(err) if err else "unknown error",
                        self.counters["send_errors"])

    async def _watch_native_errors(self) -> None:
        """The native sender counts what it could not send; say so in the log."""
        while True:
            await asyncio.sleep(1.0)
            stats = self.sender.stats()
            errors = stats.get("errors", 0)
            if errors > self._errors_seen and self._may_log():
                new, self._errors_seen = errors - self._errors_seen, errors
                err = stats.get("last_errno", 0)
                log.warning("dhcp: %d replies could not be sent (native sender): %s "
                            "(%d in all)", new, os.strerror(err) if err else "unknown error",
                            errors)

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
        for _row, token in batch:
            if token is not None:  # None: answered before the commit
                send(*token)
        self.counters["lease_commits"] += 1
        if self._pending:
            self._kick()
        else:
            assert self._idle is not None
            self._idle.set()
