"""TMCD's TCP connections on a native thread (``bootherd._tmcdfront``), when it is built.

Profiling a 10,000-node OS phase showed the event loop's work per connection (protocol
objects, callbacks, socket options, transport writes and closes) costing more than the
replies themselves.  With the extension, one native thread accepts, reads each request
to its end, writes each reply and closes each connection; the event loop only collects
complete requests (a batch per wake-up), puts them in a backlog served by the rules of
:mod:`.priority` (a node in TBSETUP first, oldest first, a repeated request decided once)
and hands back the replies.  A connection that asks for TLS is handed to the Python
transport (``_TcpConn``) with what was read.  A plain read-only request (``[VERSION=n]
command``, server.PURE_COMMANDS) from an address whose answers the loop has put in the
thread's table is answered by the thread itself, without Python.  Without the
extension, or with ``tmcd.native_front = false``, every connection goes through the
Python transport.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any

from ..backlog import Backlog
from ..netaddr import ROUTE_CACHE_SECONDS, WILDCARDS, local_address, norm_ip
from . import priority
from .protocol import parse_request

if TYPE_CHECKING:
    from .server import TmcdServer

try:
    from .. import _tmcdfront
except ImportError:  # pragma: no cover - the extension was not built
    _tmcdfront = None

log = logging.getLogger("bootherd.tmcd")

available = _tmcdfront is not None
SERVE_BATCH = 256  # requests decided per loop iteration before new ones are collected
TLS_HANDOFF = 1
# The front's counters, and the names they are added to in the tmcd counters.
_COUNTS = {"connections": "tcp_connections", "timeouts": "timeouts", "overflow": "overflow",
           "errors": "front_errors", "answered": "answered_natively"}
# The answer table is filled for an address once it has asked this many plain pure
# commands through Python: a node asking one by one asks for the rest next (the original
# boot asks 20), one asking only `status` and `fullconfig` would not use it.
FILL_AFTER = 2
# The outcome of a request answered from the table, as tag % 4: an empty reply, a reply,
# or refused (the only refusals a plain TCP request from a node can meet).
_OUTCOMES = ("", "reply", "not_allocated", "tls_required")


class NativeFront:
    """The native thread's requests, served from a backlog on the event loop."""

    def __init__(self, srv: TmcdServer, socks: list[socket.socket]):
        self.srv = srv
        self.socks = socks
        self.front: Any = _tmcdfront.Front([s.fileno() for s in socks],
                                           max_request=srv.max_request,
                                           read_timeout=srv.read_timeout,
                                           max_open=srv.max_connections + srv.max_queued)
        self.backlog: Backlog[list] = Backlog(priority.DEADLINES)
        self._loop = asyncio.get_running_loop()
        self._serving = False
        self._seen = dict.fromkeys(_COUNTS, 0)
        self._tasks: set[asyncio.Task] = set()
        self._loop.add_reader(self.front.fileno(), self._ready)
        # The answer table (plain pure requests answered on the thread): only where the
        # server is told of every new snapshot (TmcdServer.answer_natively), and not while
        # every request is logged.  Per address, how many plain pure requests Python answered
        # this snapshot (FILL_AFTER: its answers are then in the table).
        self.answering = False
        self._asked: dict[str, int] = {}
        self._gen: int | None = None
        from .server import PURE_COMMANDS

        self._pure = frozenset(PURE_COMMANDS)
        # tag = 4 * command index + outcome: what the counters need of a hit
        self._tags = {name: 4 * i for i, name in enumerate(PURE_COMMANDS)}
        self._tag_names = PURE_COMMANDS
        self._forget_timer: asyncio.TimerHandle | None = None

    def answer_natively(self) -> None:
        """Let the thread answer plain pure requests from its table; the owner calls
        `snapshot_changed` on every new snapshot."""
        self.answering = True
        self._gen = self.srv.snapshot().generation
        if self.srv.address in WILDCARDS:
            # Replies name the address asked, from a route looked up again this often.
            self._forget_timer = self._loop.call_later(ROUTE_CACHE_SECONDS, self._forget_routes)

    def snapshot_changed(self) -> None:
        """A new snapshot: every answer in the table is forgotten before anything else
        is answered from it."""
        self.front.forget_answers()
        self._asked.clear()
        self._gen = self.srv.snapshot().generation

    def _forget_routes(self) -> None:
        self.snapshot_changed()
        self._forget_timer = self._loop.call_later(ROUTE_CACHE_SECONDS, self._forget_routes)

    def _learn(self, data: bytes, peer: str, snap: Any) -> None:
        """After Python answered `data` from `peer`: fill the table for that address
        once it asked FILL_AFTER plain pure requests."""
        n = self._asked.get(peer, 0)
        if n < 0:
            return  # filled
        try:
            req = parse_request(data, self.srv.max_request)
        except ValueError:
            return
        if (req.args or req.command not in self._pure or req.vnodeid or req.proxyfor
                or req.privkey or req.redirect or req.extra):
            return
        n += 1
        if n < FILL_AFTER:
            self._asked[peer] = n
            return
        self._asked[peer] = -1
        if snap.generation != self._gen:
            return  # snapshot_changed() is on its way
        srv = self.srv
        here = local_address(srv.address, norm_ip(peer))
        tags = self._tags
        self.front.answers(peer, [
            (name, reply, tags[name] + (_OUTCOMES.index(refused) if refused else bool(reply)))
            for name, reply, refused in srv.core.plain_answers(peer, snap, here)
            if not refused or refused in _OUTCOMES])

    @property
    def open(self) -> int:
        return self.front.stats()["open"]

    def _ready(self) -> None:
        srv, bl = self.srv, self.backlog
        snap = srv.snapshot()
        now = self._loop.time()
        classify, state_of = priority.classify, srv.node_state
        for cid, data, peer, kind in self.front.collect():
            if kind == TLS_HANDOFF:
                self._tls(cid, data)
                continue
            key, cls = classify(peer, data, snap, state_of)
            waiting = bl.get(key)
            if waiting is not None:  # the same request again: answered with the first one
                waiting[2].append(cid)
                srv.c["duplicates_queued"] += 1
                continue
            bl.add([data, peer, [cid]], key, cls, now)
        self._count()
        if len(bl) and not self._serving:
            self._serving = True
            self._loop.call_soon(self._serve)

    def _serve(self) -> None:
        process, replies = self.srv.process, []
        learn = self._learn if self.answering and not self.srv.log_requests else None
        snap = self.srv.snapshot()
        for data, peer, cids in self.backlog.take(self._loop.time(), SERVE_BATCH):
            out = process(data, peer, False, lambda r, cids=cids: self._reply(cids, r))
            if out is not None:
                replies.extend((cid, out) for cid in cids)
            if learn is not None:
                learn(data, peer, snap)
        if replies:
            self.front.reply_many(replies)  # one lock and one wake-up of the thread
        if len(self.backlog):
            self._loop.call_soon(self._serve)
        else:
            self._serving = False

    def _reply(self, cids: list[int], reply: bytes) -> None:
        self.front.reply_many([(cid, reply) for cid in cids])

    def _count(self) -> None:
        st = self.front.stats()
        c = self.srv.c
        for k, name in _COUNTS.items():
            if st[k] != self._seen[k]:
                c[name] += st[k] - self._seen[k]
                self._seen[k] = st[k]
        if st["answered"]:
            # Requests the thread answered count as the core counts its own.
            for tag, n in self.front.answer_hits():
                c["requests"] += n
                c["cmd_" + self._tag_names[tag // 4]] += n
                outcome = _OUTCOMES[tag % 4]
                if outcome == "reply":
                    c["replies"] += n
                elif outcome:
                    c["errors"] += n
                    c[outcome] += n

    def _tls(self, cid: int, data: bytes) -> None:
        """A connection that opened with ISPEAKSSL_TMCDV10: the Python transport's."""
        try:
            fd = self.front.detach(cid)
        except KeyError:
            return
        task = self._loop.create_task(self._adopt(fd, data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, fd: int, data: bytes) -> None:
        from .server import _TcpConn

        sock = socket.socket(fileno=fd)
        try:
            _tr, proto = await self._loop.connect_accepted_socket(
                lambda: _TcpConn(self.srv, handed=True), sock)
        except OSError as e:
            log.debug("tmcd: TLS connection lost before it was adopted: %s", e)
            sock.close()
            return
        proto.data_received(data)

    def close(self) -> None:
        if self._forget_timer is not None:
            self._forget_timer.cancel()
        self._loop.remove_reader(self.front.fileno())
        self._count()
        self.front.close()
        for s in self.socks:
            s.close()
        for t in self._tasks:
            t.cancel()
