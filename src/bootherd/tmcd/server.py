"""TMCD server: a sans-IO core (request bytes + source address + snapshot -> outcome)
and a thin asyncio TCP/UDP transport around it.

Identity is the request's source address (or PRIVKEY); everything a node is
told comes from `Views`, i.e. from the current Snapshot.  The core keeps two
bits of memory: the fullconfig digest each node last fetched (for isalive's
UPDATE=1) and nothing else; clocks and state writes stay in the transport.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from ..inventory.model import Node, Snapshot
from ..netaddr import norm_ip
from .protocol import (
    COMMANDS,
    SECRET_COMMANDS,
    Malformed,
    Request,
    is_tls_hello,
    parse_request,
    valid_state,
)
from .views import Views

log = logging.getLogger("bootherd.tmcd")

LOOPBACK_SELF = frozenset({"127.0.0.1", "::1"})  # only these may send REDIRECT=
IDLE_GRACE = 0.05  # s: a request ending in a space, then silence, is complete (nc, old clients)
UDP_MAX_REPLY = 65000
# A `state` request over TCP is answered once its event is committed (a server
# killed after answering has lost nothing it confirmed), but never later than
# this: while the database is away, nodes keep booting and the event waits.
STATE_COMMIT_WAIT = 2.0
ABORT_ON_DEATH = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
GRACEFUL_CLOSE = struct.pack("ii", 0, 0)


@dataclass(slots=True)
class Outcome:
    reply: bytes = b""
    node_id: str | None = None
    command: str | None = None
    state: str | None = None  # a state to record for node_id
    event: str | None = None  # "isalive" | "reboot" | "fullconfig"


class TmcdCore:
    """Decides every reply.  No sockets, no clock."""

    def __init__(self, views: Views, counters: Counter | None = None, max_request: int = 4096):
        self.views = views
        self.c = counters if counters is not None else Counter()
        self.max_request = max_request
        self.fetched: dict[str, str] = {}  # node_id -> digest of its last TCP fullconfig

    def identify(self, req: Request, peer_ip: str, snap: Snapshot) -> Node | None:
        """The node a request speaks for, or None (then it gets nothing)."""
        ip = norm_ip(peer_ip)
        if req.redirect is not None:
            if ip not in LOOPBACK_SELF:
                self.c["redirect_refused"] += 1
                return None
            ip = norm_ip(req.redirect)
        node = snap.by_privkey.get(req.privkey) if req.privkey else snap.by_ip.get(ip)
        if node is None:
            self.c["unknown_node"] += 1
            return None
        if req.vnodeid and req.proxyfor and req.vnodeid != req.proxyfor:
            self.c["vnode_refused"] += 1
            return None
        vn = req.target_vnode
        if vn is not None:
            v = snap.nodes.get(vn)
            if (v is None or v.phys_node_id != node.node_id
                    or vn not in snap.vnodes.get(node.node_id, ())):
                self.c["vnode_refused"] += 1
                return None
            node = v
        return node

    def handle(self, data: bytes, peer_ip: str, snap: Snapshot, udp: bool = False) -> Outcome:
        self.c["requests"] += 1
        try:
            req = parse_request(data, self.max_request)
        except Malformed:
            self.c["malformed"] += 1
            return Outcome()
        node = self.identify(req, peer_ip, snap)
        if node is None:
            self.c["errors"] += 1
            return Outcome(command=req.command)
        out = self._answer(req, node, snap, udp)
        out.node_id, out.command = node.node_id, req.command
        if out.reply:
            self.c["replies"] += 1
        self.c["cmd_" + (req.command if req.command in COMMANDS else "other")] += 1
        return out

    def _answer(self, req: Request, node: Node, snap: Snapshot, udp: bool) -> Outcome:
        cmd = req.command
        if udp and cmd in SECRET_COMMANDS and cmd != "fullconfig":
            self.c["udp_secret_refused"] += 1
            return Outcome()
        if cmd == "state":
            if not valid_state(req.args):
                self.c["errors"] += 1
                return Outcome()
            return Outcome(state=req.args)
        if cmd == "reboot":
            return Outcome(event="reboot")
        if cmd == "isalive":
            digest = self.views.digest(snap, node)
            last = self.fetched.setdefault(node.node_id, digest)
            return Outcome(f"UPDATE={int(last != digest)}\n".encode(), event="isalive")
        if cmd == "fullconfig":
            if udp:  # secret sections are left out over UDP
                return Outcome(self.views.fullconfig(snap, node, secrets=False).encode())
            self.fetched[node.node_id] = self.views.digest(snap, node)
            return Outcome(self.views.fullconfig(snap, node).encode(), event="fullconfig")
        text = self.views.command(snap, node, cmd)
        if text is None:
            self.c["unknown_command"] += 1
            self.c["errors"] += 1
            return Outcome()
        return Outcome(text.encode())


# --- transport -----------------------------------------------------------------------

class TmcdServer:
    """TCP and UDP listeners around one TmcdCore.

    Connections beyond `max_connections` are accepted and queued (reading
    paused) rather than refused, and get a slot in arrival order; every slot
    is bounded by `read_timeout`, so slow clients cannot hold others back.
    """

    def __init__(self, core: TmcdCore, snapshot: Callable[[], Snapshot], *,
                 address: str = "127.0.0.1", ports: tuple[int, ...] = (7777,),
                 max_connections: int = 2048, read_timeout: float = 5.0,
                 max_request: int = 4096,
                 record_state: Callable[..., None] | None = None,
                 max_queued: int | None = None):
        self.core = core
        self.snapshot = snapshot
        self.address = address
        self.ports = ports
        self.max_connections = max(1, max_connections)
        self.max_queued = max_queued if max_queued is not None else 8 * self.max_connections
        self.read_timeout = read_timeout
        self.max_request = max_request
        self.record_state = record_state
        self.c = core.c
        self.active = 0
        self.waiting: deque[_TcpConn] = deque()
        self.alive: dict[str, tuple[int, float]] = {}  # node_id -> (isalive count, last time)
        self.reboots: dict[str, float] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self.bound: list[tuple[str, int]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for port in self.ports:
                srv = await loop.create_server(lambda: _TcpConn(self), self.address, port,
                                               backlog=4096, reuse_address=True)
                self._servers.append(srv)
                real = srv.sockets[0].getsockname()[1]
                # Our own socket: uvloop refuses local_addr= on a port TCP already holds.
                fam = socket.AF_INET6 if ":" in self.address else socket.AF_INET
                us = socket.socket(fam, socket.SOCK_DGRAM)
                try:
                    us.bind((self.address, real))
                except OSError:
                    us.close()
                    raise
                us.setblocking(False)
                tr, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=us)
                self._udp.append(tr)
                self.bound.append((self.address, real))
        except OSError as e:
            await self.stop()
            raise OSError(e.errno, f"tmcd: cannot listen on {self.address}:{port}: "
                                   f"{e.strerror}") from None

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        for t in self._udp:
            t.close()
        for s in self._servers:
            try:
                await asyncio.wait_for(s.wait_closed(), 1.0)
            except (TimeoutError, Exception):  # noqa: BLE001 - best effort on shutdown
                pass
        self._servers, self._udp = [], []

    # -- called by the connections --------------------------------------------------

    def process(self, data: bytes, peer_ip: str, udp: bool,
                reply: Callable[[bytes], None] | None = None) -> bytes | None:
        """The reply to one request.  With `reply` (TCP), a `state` request is
        answered only once its event is committed: None is returned and
        `reply` is called later on the event loop."""
        try:
            out = self.core.handle(data, peer_ip, self.snapshot(), udp)
        except Exception:  # noqa: BLE001 - one bad request must never take the server down
            log.exception("tmcd request failed peer=%s", peer_ip)
            self.c["internal_errors"] += 1
            return b""
        if out.node_id:
            if out.state and self.record_state:
                try:
                    if reply is not None:
                        self._record_then_reply(out.node_id, out.state, out.reply, reply)
                        return None
                    self.record_state(out.node_id, out.state)
                except Exception:  # noqa: BLE001
                    log.exception("record_state failed")
            if out.event == "isalive":
                n, _ = self.alive.get(out.node_id, (0, 0.0))
                self.alive[out.node_id] = (n + 1, time.time())
            elif out.event == "reboot":
                self.reboots[out.node_id] = time.time()
        return out.reply

    def _record_then_reply(self, node_id: str, state: str, answer: bytes,
                           reply: Callable[[bytes], None]) -> None:
        """Answer once the state is committed, or after STATE_COMMIT_WAIT at most:
        while the database is away the event stays queued and nodes keep booting."""
        loop = asyncio.get_running_loop()
        sent = False

        def send(durable: bool) -> None:
            nonlocal sent
            if not sent:
                sent = True
                if not durable:
                    self.c["state_reply_before_commit"] += 1
                reply(answer)

        timer = loop.call_later(STATE_COMMIT_WAIT, send, False)

        def committed() -> None:
            timer.cancel()
            send(True)

        assert self.record_state is not None
        self.record_state(node_id, state, lambda: loop.call_soon_threadsafe(committed))

    def slot_free(self) -> None:
        self.active -= 1
        while self.waiting:
            conn = self.waiting.popleft()
            if not conn.closed:
                self.active += 1
                conn.begin()
                return


class _TcpConn(asyncio.Protocol):
    __slots__ = ("srv", "tr", "buf", "timer", "has_slot", "closed", "done", "peer")

    def __init__(self, srv: TmcdServer):
        self.srv = srv
        self.tr: asyncio.Transport | None = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.has_slot = False
        self.closed = False
        self.done = False
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]
        # TMCD's reply ends with the close (a `state` reply is empty), so a server killed
        # before it answers must reset the connection, not close it: a FIN would look to
        # the node like an empty, successful answer.  The reply turns this off (_finish).
        self._linger(ABORT_ON_DEATH)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        srv = self.srv
        srv.c["tcp_connections"] += 1
        if srv.active < srv.max_connections:
            srv.active += 1
            self.begin()
        elif len(srv.waiting) < srv.max_queued:
            srv.c["queued"] += 1
            transport.pause_reading()
            srv.waiting.append(self)
        else:
            srv.c["overflow"] += 1
            self.done = True
            transport.abort()

    def begin(self) -> None:
        self.has_slot = True
        assert self.tr is not None
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.srv.read_timeout, self._timeout)
        try:
            self.tr.resume_reading()
        except RuntimeError:
            pass

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data
        if is_tls_hello(self.buf):
            # TLS is recognised but not offered: close rather than misread the handshake.
            self.srv.c["tls_refused"] += 1
            self._finish(b"")
        elif b"\n" in self.buf or len(self.buf) > self.srv.max_request:
            self._answer()
        elif self.buf[-1:] in (b" ", b"\t"):
            if self.timer:
                self.timer.cancel()
            self.timer = asyncio.get_running_loop().call_later(IDLE_GRACE, self._idle)

    def eof_received(self) -> bool:
        if not self.done:
            if self.buf:
                self._answer()
            else:
                self._finish(b"")
        return True  # keep the write side open until our reply is flushed

    def _idle(self) -> None:
        if not self.done:
            self._answer()

    def _answer(self) -> None:
        self.done = True  # no further input is read for this request
        if self.timer:
            self.timer.cancel()
            self.timer = None
        out = self.srv.process(self.buf, self.peer, False, self._finish)
        if out is not None:
            self._finish(out)
        # else: waiting for the commit; a server killed meanwhile resets the connection
        # (connection_made) and the node asks again.

    def _timeout(self) -> None:
        if self.done:
            # The reply was written but the client never read it: drop the connection.
            if self.tr is not None:
                self.tr.abort()
            return
        self.srv.c["timeouts"] += 1
        self.done = True
        if self.tr is not None:
            self.tr.abort()

    def _linger(self, value: bytes) -> None:
        sock = self.tr.get_extra_info("socket") if self.tr is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, value)
            except OSError:
                pass

    def _finish(self, reply: bytes) -> None:
        self.done = True
        tr = self.tr
        if tr is None or self.closed:
            return  # the client went away while its state was being committed
        self._linger(GRACEFUL_CLOSE)
        if self.timer:
            self.timer.cancel()
        if reply:
            tr.write(reply)
        tr.close()  # the close ends the reply; buffered data is flushed first
        if tr.get_write_buffer_size():
            self.timer = asyncio.get_running_loop().call_later(self.srv.read_timeout,
                                                               self._timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer:
            self.timer.cancel()
        if self.has_slot:
            self.has_slot = False
            self.srv.slot_free()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, srv: TmcdServer):
        self.srv = srv
        self.tr: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.srv.c["udp_datagrams"] += 1
        reply = self.srv.process(data, addr[0], True)
        if not reply or self.tr is None:
            return
        if len(reply) > UDP_MAX_REPLY:
            self.srv.c["udp_too_large"] += 1
            return
        self.tr.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        self.srv.c["udp_errors"] += 1
