"""TMCD server: a sans-IO core (request bytes + source address + transport + snapshot
-> outcome) and a thin asyncio TCP/UDP/TLS transport around it.

Identity is the request's source address (or PRIVKEY); everything a node is
told comes from `Views`, i.e. from the current Snapshot.  The fullconfig digest
each node last fetched (for isalive's UPDATE=1) is the lifecycle coordinator's:
the core asks it (`ConfigMemory`) and the transport tells it what a node
fetched, as it reports states.  The core keeps which nodes reported `ready`
(for readycount); clocks stay in the transport.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import ssl
import struct
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..inventory.model import Node, Snapshot
from ..logs import RateLimited, event
from ..netaddr import local_address, norm_ip
from . import front
from .protocol import (
    ALLOCATED,
    COMMAND_TABLE,
    EVENT,
    REMUDP,
    SECRET,
    TCPONLY,
    TLS,
    TLS_PREFIX,
    Malformed,
    Request,
    is_tls_hello,
    parse_request,
    valid_state,
)
from .tls import TlsSession
from .views import Ask, Views

log = logging.getLogger("bootherd.tmcd")

LOOPBACK_SELF = frozenset({"127.0.0.1", "::1"})  # only these may send REDIRECT=
DEFAULT_TRUSTED = ("127.0.0.0/8", "::1/128")
IDLE_GRACE = 0.05  # s: a request ending in a space, then silence, is complete (nc, old clients)
UDP_MAX_REPLY = 65000
# A `state` request over TCP is answered once its event is committed (a server
# killed after answering has lost nothing it confirmed), but never later than
# this: while the database is away, nodes keep booting and the event waits.
STATE_COMMIT_WAIT = 2.0
# States a later report of the same boot always follows (TBSETUP: then ISUP or TBFAILED)
# are answered at once, as Emulab's tmcd answers every `state` (it hands the event to
# stated and never confirms it): a server killed before the commit loses one line of
# history, and the node's next report, which waits for its commit, records the boot.
EARLY_REPLY_STATES = frozenset({"TBSETUP"})
ABORT_ON_DEATH = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
GRACEFUL_CLOSE = struct.pack("ii", 0, 0)


@dataclass(slots=True)
class Outcome:
    reply: bytes = b""
    node_id: str | None = None
    command: str | None = None
    state: str | None = None  # a state to record for node_id
    event: str | None = None  # "isalive" | "reboot" | "fullconfig" | another report's name
    digest: str | None = None  # the node's configuration digest (isalive, fullconfig)


class ConfigMemory(Protocol):
    """What a node last fetched (the lifecycle coordinator keeps it)."""

    def config_outdated(self, node_id: str, digest: str) -> bool: ...


class TmcdLifecycle(ConfigMemory, Protocol):
    """What the transport reports to the lifecycle coordinator."""

    def state_reported(self, node_id: str, state: str, source: str = "tmcd",
                       committed: Callable[[], None] | None = None) -> None: ...

    def config_seen(self, node_id: str, digest: str, fetched: bool) -> None: ...


class _NothingKnown:
    """A core without a coordinator remembers no fetch: every config is current."""

    def config_outdated(self, node_id: str, digest: str) -> bool:
        return False


# Commands whose reply to a plain TCP request (`[VERSION=n ]command`, no arguments, no
# other option, no TLS) is a function of the snapshot, the asking address and the address
# asked only: no report, no state, nothing the lifecycle coordinator or the `ready` set
# holds (isalive, fullconfig's fetched digest, readycount, bootwhat).  The native front
# may answer these itself from a per-address table (front.py).
PURE_COMMANDS = tuple(sorted(
    name for name, c in COMMAND_TABLE.items()
    if not c.has(EVENT) and name not in ("fullconfig", "readycount", "bootwhat")))


@dataclass(frozen=True, slots=True)
class Asker:
    """The node a request speaks for, and how it asked."""

    node: Node      # the node the reply is about (the vnode when one was named)
    via: Node       # the node that connected (the vnode's host for VNODEID/PROXYFOR)
    as_vnode: bool  # a vnode asking for itself (PROXYFOR, or its own address)


def _itself(node: Node) -> Asker:
    """A node asking for itself (a vnode from its own address asks as the vnode)."""
    return Asker(node, node, as_vnode=node.phys_node_id is not None)


_RUSAGE_RE = re.compile(r"^LA1=[-+\d.eE]+ LA5=[-+\d.eE]+ LA15=[-+\d.eE]+ DUSED=[-+\d.eE]+")
_BATTERY_RE = re.compile(r"^CAPACITY=([-+\d.eE]+) VOLTAGE=([-+\d.eE]+)")


def _number(text: str, kind: type = float) -> float | int | None:
    try:
        return kind(text.split()[0]) if text.split() else None
    except ValueError:
        return None


class TmcdCore:
    """Decides every reply.  No sockets, no clock.

    The rules come from the command table (protocol.COMMAND_TABLE) and are
    applied in tmcd's order: who is asking, which command, UDP from off the
    trusted ranges, TLS for secrets, allocation; then the reply."""

    def __init__(self, views: Views, counters: Counter | None = None, max_request: int = 4096,
                 trusted: list[str] | tuple[str, ...] = DEFAULT_TRUSTED,
                 configs: ConfigMemory | None = None):
        self.views = views
        self.configs: ConfigMemory = configs or _NothingKnown()
        self.c = counters if counters is not None else Counter()
        self.max_request = max_request
        self.trusted = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)
        self._local: dict[str, bool] = {}
        self.ready: set[tuple[str, str, str]] = set()  # (node, pid, eid) that sent `ready`

    def is_local(self, ip: str) -> bool:
        """On the control network's trusted ranges (tmcd's "local" nodes)?"""
        hit = self._local.get(ip)
        if hit is None:
            try:
                a = ipaddress.ip_address(ip)
                hit = any(a in n for n in self.trusted if n.version == a.version)
            except ValueError:
                hit = False
            if len(self._local) >= 65536:  # remembered per address: nodes ask again
                self._local.clear()
            self._local[ip] = hit
        return hit

    def identify(self, req: Request, peer_ip: str, snap: Snapshot) -> Asker | None:
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
        if vn is None:
            return _itself(node)
        v = snap.nodes.get(vn)
        if (v is None or v.phys_node_id != node.node_id
                or vn not in snap.vnodes.get(node.node_id, ())):
            self.c["vnode_refused"] += 1
            return None
        return Asker(v, node, as_vnode=req.proxyfor is not None)

    def handle(self, data: bytes, peer_ip: str, snap: Snapshot, udp: bool = False,
               tls: bool = False, cert_cn: str | None = None, server: str = "") -> Outcome:
        """One request.  `tls`: it came over TLS; `cert_cn`: the common name of
        the client certificate that TLS verified, if one was presented; `server`:
        the address it reached (what replies name for this server unless
        server.public_address does)."""
        self.c["requests"] += 1
        try:
            req = parse_request(data, self.max_request)
        except Malformed:
            self.c["malformed"] += 1
            return Outcome()
        who = self.identify(req, peer_ip, snap)
        if who is None:
            self.c["errors"] += 1
            return Outcome(command=req.command)
        out = Outcome(command=req.command, node_id=who.node.node_id)
        # The address that counts: REDIRECT's (honoured only from the server itself).
        local = self.is_local(norm_ip(req.redirect or peer_ip))
        refused = self._refusal(req, who, local, udp, tls, cert_cn)
        if refused:
            self.c[refused] += 1
            self.c["errors"] += 1
        else:
            ask = Ask(who.node, snap.experiment_of(who.node), vnode=who.node.phys_node_id
                      is not None, as_vnode=who.as_vnode, local=local, args=req.args,
                      server=norm_ip(server))
            out = self._answer(req, ask, snap, udp, secrets=tls or local)
            out.node_id, out.command = who.node.node_id, req.command
        if out.reply:
            self.c["replies"] += 1
        self.c["cmd_" + (req.command if req.command in COMMAND_TABLE else "other")] += 1
        return out

    def plain_answers(self, peer_ip: str, snap: Snapshot, server: str = ""
                      ) -> list[tuple[str, bytes, str | None]]:
        """What every PURE_COMMANDS command gets as a plain TCP request from `peer_ip`
        (what `handle` decides, without counting): (command, reply, the counter of its
        refusal or None); [] for an address that is no node's."""
        node = snap.by_ip.get(norm_ip(peer_ip))
        if node is None:
            return []
        who, local = _itself(node), self.is_local(norm_ip(peer_ip))
        ask = Ask(node, snap.experiment_of(node), vnode=node.phys_node_id is not None,
                  as_vnode=who.as_vnode, local=local, server=norm_ip(server))
        out = []
        for name in PURE_COMMANDS:
            req = parse_request(name.encode())
            refused = self._refusal(req, who, local, False, False, None)
            reply = b"" if refused else self._answer(req, ask, snap, False, local).reply
            out.append((name, reply, refused))
        return out

    def _refusal(self, req: Request, who: Asker, local: bool, udp: bool, tls: bool,
                 cert_cn: str | None) -> str | None:
        """Why this request gets nothing (a counter's name), or None."""
        cmd = COMMAND_TABLE.get(req.command)
        if cmd is None:
            return "unknown_command"
        if udp:
            if not local and not cmd.has(REMUDP):
                return "udp_remote_refused"
            if cmd.has(TCPONLY) or cmd.has(SECRET):
                return "udp_secret_refused"
        elif cmd.has(SECRET) and not tls and not local:
            return "tls_required"
        if cmd.has(TLS) and not tls:
            return "tls_required"
        if cmd.has(ALLOCATED) and who.node.allocation is None:
            return "not_allocated"
        if cert_cn is not None and cert_cn != who.via.node_id:
            return "cert_mismatch"
        return None

    def _answer(self, req: Request, a: Ask, snap: Snapshot, udp: bool,
                secrets: bool) -> Outcome:
        cmd, args, node = req.command, req.args, a.node
        if cmd == "state":
            if not valid_state(args):
                self.c["errors"] += 1
                return Outcome()
            return Outcome(state=args)
        if cmd in ("isalive", "rusage"):
            if cmd == "rusage" and not _RUSAGE_RE.match(args):
                self.c["errors"] += 1
                return Outcome()
            digest = self.views.digest(snap, node)
            update = self.configs.config_outdated(node.node_id, digest)
            return Outcome(f"UPDATE={int(update)}\n".encode(), event="isalive", digest=digest)
        if cmd == "fullconfig":
            text = self.views.fullconfig_bytes(snap, a, udp=udp, secrets=secrets)
            if udp:
                return Outcome(text)
            return Outcome(text, event="fullconfig",
                           digest=self.views.digest(snap, node))
        if COMMAND_TABLE[cmd].has(EVENT):
            return self._report(cmd, args, a)
        if cmd == "readycount":
            if a.vnode or a.exp is None:
                return Outcome()
            members = snap.experiment_nodes.get((a.exp.pid, a.exp.eid), ())
            ready = sum((m, a.exp.pid, a.exp.eid) in self.ready for m in members)
            return Outcome(f"READY={ready} TOTAL={len(members)}\n".encode())
        return Outcome(self.views.reply(snap, a, cmd))

    def _report(self, cmd: str, args: str, a: Ask) -> Outcome:
        """A node telling the server something: checked as tmcd checks it."""
        if cmd == "ready":
            if not a.vnode and a.exp is not None:
                self.ready.add((a.node.node_id, a.exp.pid, a.exp.eid))
            return Outcome(event="ready")
        if cmd in ("startstatus", "startstat", "booterrno"):
            ok = _number(args, int) is not None
        elif cmd == "ntpdrift":
            ok = a.local and _number(args) is not None
        elif cmd == "elvindport":
            n = _number(args, int)
            ok = n is not None and n >= 0
        elif cmd == "battery":
            m = _BATTERY_RE.match(args)
            cap, volt = (_number(m.group(1)), _number(m.group(2))) if m else (None, None)
            ok = cap is not None and volt is not None and 0 <= cap <= 100 and 5 <= volt <= 15
            if ok:
                return Outcome(b"OK\n", event="battery")
        else:  # reboot, reset, hostkeys, hostinfo, bootlog, sfshostid: free-form
            ok = True
        if not ok:
            self.c["bad_report"] += 1
            self.c["errors"] += 1
            return Outcome()
        return Outcome(event=cmd)


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
                 lifecycle: TmcdLifecycle | None = None,
                 max_queued: int | None = None, tls: ssl.SSLContext | None = None,
                 native_front: bool = True,
                 node_state: Callable[[str], str | None] | None = None):
        self.core = core
        self.snapshot = snapshot
        self.address = address
        self.ports = ports
        self.max_connections = max(1, max_connections)
        self.max_queued = max_queued if max_queued is not None else 8 * self.max_connections
        self.read_timeout = read_timeout
        self.max_request = max_request
        self.lifecycle = lifecycle
        self.tls = tls  # None: a client asking for TLS is closed at once (tls_refused)
        self.c = core.c
        # One info line per request (log.requests = ["tmcd"]) and bad input logged once
        # per interval per source; the service sets both from the configuration.
        self.log_requests = False
        self.bad_input = RateLimited(log)
        self.active = 0
        self.waiting: deque[_TcpConn] = deque()
        self._servers: list[asyncio.AbstractServer] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self.bound: list[tuple[str, int]] = []
        # Connections on a native thread when the extension is built (front.py); the node
        # states order its backlog (front.priority).
        self.native_front = native_front and front.available
        self.node_state = node_state
        self.front: front.NativeFront | None = None
        self._commits: _CommitWait | None = None
        # Plain pure requests answered by the native thread from a table (front.py): only
        # when the owner calls snapshot_changed() on every new snapshot.
        self.answer_natively = False

    @property
    def open_connections(self) -> int:
        """TCP connections open now (the native thread's and the Python transport's)."""
        return self.active + (self.front.open if self.front is not None else 0)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        listening: list[socket.socket] = []
        try:
            for port in self.ports:
                tcp = _listen(self.address, port)
                real = tcp.getsockname()[1]
                if self.native_front:
                    listening.append(tcp)
                else:
                    srv = await loop.create_server(lambda: _TcpConn(self), sock=tcp,
                                                   backlog=4096)
                    self._servers.append(srv)
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
            if listening:
                self.front = front.NativeFront(self, listening)
                if self.answer_natively:
                    self.front.answer_natively()
        except OSError as e:
            for s in listening:
                s.close()
            await self.stop()
            raise OSError(e.errno, f"tmcd: cannot listen on {self.address}:{port}: "
                                   f"{e.strerror}") from None

    async def stop(self) -> None:
        if self.front is not None:
            self.front.close()
            self.front = None
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

    def snapshot_changed(self) -> None:
        """A new snapshot is in place (called in the loop step that swapped it)."""
        if self.front is not None and self.front.answering:
            self.front.snapshot_changed()

    # -- called by the connections --------------------------------------------------

    def process(self, data: bytes, peer_ip: str, udp: bool,
                reply: Callable[[bytes], None] | None = None, tls: bool = False,
                cert_cn: str | None = None, local: str = "") -> bytes | None:
        """The reply to one request.  With `reply` (TCP), a `state` request is
        answered only once its event is committed: None is returned and
        `reply` is called later on the event loop."""
        malformed = self.c["malformed"]
        try:
            here = local or local_address(self.address, norm_ip(peer_ip))
            out = self.core.handle(data, peer_ip, self.snapshot(), udp, tls, cert_cn, here)
        except Exception:  # noqa: BLE001 - one bad request must never take the server down
            self.bad_input(peer_ip, "tmcd request failed", exc_info=True, remote=peer_ip)
            self.c["internal_errors"] += 1
            return b""
        if self.c["malformed"] != malformed:
            self.bad_input(peer_ip, "tmcd bad input", what="malformed", remote=peer_ip,
                           bytes=len(data))
        if self.log_requests:
            event(log, logging.INFO, "tmcd request", remote=peer_ip,
                  transport="udp" if udp else "tls" if tls else "tcp",
                  command=out.command or "", node=out.node_id or "",
                  outcome="answered" if out.reply else "refused" if out.command else "malformed",
                  bytes=len(out.reply))
        lc = self.lifecycle
        if out.node_id and lc is not None:
            try:
                if out.state:
                    if reply is not None and out.state not in EARLY_REPLY_STATES:
                        self._record_then_reply(out.node_id, out.state, out.reply, reply)
                        return None
                    lc.state_reported(out.node_id, out.state)
                elif out.digest is not None:
                    lc.config_seen(out.node_id, out.digest, fetched=out.event == "fullconfig")
            except Exception:  # noqa: BLE001
                log.exception("tmcd: reporting to the lifecycle failed")
        return out.reply

    def _record_then_reply(self, node_id: str, state: str, answer: bytes,
                           reply: Callable[[bytes], None]) -> None:
        """Answer once the state is committed, or after STATE_COMMIT_WAIT at most:
        while the database is away the event stays queued and nodes keep booting."""
        if self._commits is None:
            self._commits = _CommitWait(asyncio.get_running_loop(), self.c)
        assert self.lifecycle is not None
        self.lifecycle.state_reported(node_id, state,
                                      committed=self._commits.hold(answer, reply))

    def slot_free(self) -> None:
        self.active -= 1
        while self.waiting:
            conn = self.waiting.popleft()
            if not conn.closed:
                self.active += 1
                conn.begin()
                return


class _CommitWait:
    """Replies held until their state event is committed, STATE_COMMIT_WAIT at most.

    The writer thread reports each commit; the loop is woken once per batch of them
    (not once per event), and one timer serves every held reply (not one each)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, counters: Counter):
        self.loop = loop
        self.c = counters
        self.held: deque[list] = deque()  # [deadline, answer, reply, sent], oldest first
        self.committed: deque[list] = deque()  # appended on the writer thread
        self.woken = False  # a drain is scheduled
        self.timer: asyncio.TimerHandle | None = None

    def hold(self, answer: bytes, reply: Callable[[bytes], None]) -> Callable[[], None]:
        """Hold a reply; returns the callback for the writer thread."""
        item = [self.loop.time() + STATE_COMMIT_WAIT, answer, reply, False]
        self.held.append(item)
        if self.timer is None:
            self.timer = self.loop.call_at(item[0], self._expire)

        def committed() -> None:  # on the writer thread
            self.committed.append(item)
            if not self.woken:
                self.woken = True
                self.loop.call_soon_threadsafe(self._drain)
        return committed

    @staticmethod
    def _send(item: list) -> bool:
        if item[3]:
            return False
        item[3] = True
        item[2](item[1])
        return True

    def _drain(self) -> None:
        self.woken = False  # before taking: a commit reported meanwhile wakes us again
        q = self.committed
        while q:
            self._send(q.popleft())

    def _expire(self) -> None:
        now, held = self.loop.time(), self.held
        while held and (held[0][3] or held[0][0] <= now):
            if self._send(held.popleft()):
                self.c["state_reply_before_commit"] += 1
        self.timer = self.loop.call_at(held[0][0], self._expire) if held else None


def _listen(address: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(4096)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class _TcpConn(asyncio.Protocol):
    __slots__ = ("srv", "tr", "buf", "timer", "has_slot", "closed", "done", "peer", "tls",
                 "handed", "local")

    def __init__(self, srv: TmcdServer, handed: bool = False):
        self.srv = srv
        self.tr: asyncio.Transport | None = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None
        self.has_slot = False
        self.closed = False
        self.done = False
        self.peer = ""
        self.local = ""  # the address the connection reached
        self.tls: TlsSession | None = None
        self.handed = handed  # accepted and counted by the native front, which read its start

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tr = transport  # type: ignore[assignment]
        # TMCD's reply ends with the close (a `state` reply is empty), so a server killed
        # before it answers must reset the connection, not close it: a FIN would look to
        # the node like an empty, successful answer.  The reply turns this off (_finish).
        self._linger(ABORT_ON_DEATH)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        here = transport.get_extra_info("sockname")
        self.local = here[0] if here else ""
        srv = self.srv
        if not self.handed:
            srv.c["tcp_connections"] += 1
        if srv.active < srv.max_connections or self.handed:
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
        if self.tls is not None:
            self._tls_received(data)
            return
        self.buf += data
        if len(self.buf) < len(TLS_PREFIX) and TLS_PREFIX.startswith(self.buf):
            return  # perhaps the start of ISPEAKSSL_TMCDV10: wait for the rest
        if is_tls_hello(self.buf):
            if self.srv.tls is None:
                # Not offered: close rather than misread the handshake as a request.
                self.srv.c["tls_refused"] += 1
                self._finish(b"")
                return
            self.srv.c["tls_connections"] += 1
            self.tls = TlsSession(self.srv.tls)
            rest, self.buf = self.buf[len(TLS_PREFIX):], b""
            self._tls_received(rest)
        elif b"\n" in self.buf or len(self.buf) > self.srv.max_request:
            self._answer()
        elif self.buf[-1:] in (b" ", b"\t"):
            if self.timer:
                self.timer.cancel()
            self.timer = asyncio.get_running_loop().call_later(IDLE_GRACE, self._idle)

    def _tls_received(self, data: bytes) -> None:
        """Bytes inside TLS: the request is the plaintext of the first record."""
        tls = self.tls
        assert tls is not None and self.tr is not None
        try:
            plain = tls.feed(data)
        except ssl.SSLError as e:
            self.srv.c["tls_errors"] += 1
            log.debug("tmcd tls from %s: %s", self.peer, e)
            self.done = True
            self.tr.abort()
            return
        out = tls.pending()
        if out:
            self.tr.write(out)
        if plain:
            self.buf += plain
            self._answer()
        elif tls.closed_by_peer:
            self._finish(b"")

    def eof_received(self) -> bool:
        if self.tls is not None and not self.done:
            # A TLS client cannot half-close; a FIN before the request is an abort.
            self.done = True
            if self.tr is not None:
                self.tr.abort()
            return True
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
        tls = self.tls
        out = self.srv.process(self.buf, self.peer, False, self._finish, tls is not None,
                               tls.peer_cn if tls is not None else None, self.local)
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
        if self.tls is not None:
            try:
                reply = self.tls.send(reply) + self.tls.close()
            except ssl.SSLError:
                self.srv.c["tls_errors"] += 1
                reply = b""
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
