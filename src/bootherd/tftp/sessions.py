"""The TFTP request layer: which requests become transfers, when, and how each one ends.

Pure: no sockets, no files, no clock (every event carries ``now``).  The transport
(:mod:`.server`) hands it each datagram of the listen socket and each end of a session;
it answers with what to do, as data (a reply to send, sessions to end, to start or to
refuse), and keeps the request counters.  Its rules, each with a test in
``tests/tftp/test_sessions.py``:

- A session holds a slot while it is prepared and while it transfers: at most
  ``max_transfers`` in all and ``max_per_client`` per client IP.  The others wait in one
  FIFO queue for up to ``queue_wait`` seconds; past that, or with the queue full, they get
  ERROR 0 "server busy, retry" (firmware retries).  A request is never dropped silently.
- A request byte-identical to the live session of the same client TID (ip, port) is a
  retransmission: counted in ``duplicate_requests`` and ignored.  A different request
  from that TID supersedes the live session (``superseded``).
- A byte-identical request less than ``STALE_REQUEST_WINDOW`` seconds after that TID's
  transfer succeeded is a stale copy that waited in a queue: ignored (a client that
  really wants the file again gets it on its own retry).
- A read that ended after its OACK, before any DATA, with the client's ERROR or a new
  request from the same TID, and that announced ``tsize``, is a size probe: counted in
  ``probes_aborted``, not as a failure.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import asdict, dataclass, field

from . import core
from .core import End, ReadTransfer, Request, Source, WriteTransfer

STALE_REQUEST_WINDOW = 2.0  # seconds an identical request after success is a stale copy
BUSY_MESSAGE = "server busy, retry"

Client = tuple[str, int]


class State(enum.Enum):
    """Where a session is in its life; the only record of it."""

    QUEUED = "queued"  # waiting for a slot
    PREPARING = "preparing"  # holds a slot; its file and socket are being set up
    RUNNING = "running"  # transferring, driven by the event loop
    NATIVE = "native"  # transferring in the native data path
    ENDED = "ended"


_HOLDS_SLOT = (State.PREPARING, State.RUNNING, State.NATIVE)


class RequestError(Exception):
    """A request answered with an ERROR instead of a transfer."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    """Admission caps and the protocol limits requests are negotiated against."""

    max_transfers: int = 4096
    max_per_client: int = 8
    queue_wait: float = 1.0
    max_blksize: int = 1468
    max_windowsize: int = 64
    default_timeout: float = 1.0
    retries: int = 5
    max_upload: int = 64 * 2**20
    uploads: bool = False  # WRQ accepted (the transport has an upload folder)


@dataclass(slots=True)
class TransferStats:
    """Handed to ``on_transfer_done`` once per request that got a transfer."""

    client_ip: str
    client_port: int
    path: str
    bytes: int  # payload bytes delivered (read: file bytes acknowledged; write: received)
    blocks: int  # DATA packets sent (read, including retransmissions) or accepted (write)
    retries: int  # retransmitted packets
    duration: float  # seconds
    ok: bool
    error: str | None = None
    direction: str = "read"  # "read" or "write"
    probe: bool = False  # a size probe the client aborted after the OACK (firmware habit)
    options: dict[str, str] = field(default_factory=dict)  # what we acknowledged
    end: End | None = None  # why it ended


@dataclass(slots=True)
class Counters:
    """Cumulative counters (plus the ``active_transfers`` gauge) for export."""

    requests: int = 0
    read_requests: int = 0
    write_requests: int = 0
    duplicate_requests: int = 0  # retransmitted RRQ/WRQ for a live transfer
    superseded: int = 0  # live transfer replaced by a different request from the same TID
    transfers_ok: int = 0
    transfers_failed: int = 0
    probes_aborted: int = 0  # tsize probes aborted by the client (not failures)
    request_errors: int = 0  # requests answered with an ERROR (not found, access, ...)
    busy_rejections: int = 0
    queued: int = 0  # requests that had to wait for a slot
    malformed: int = 0
    unknown_tid: int = 0
    internal_errors: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    blocks_sent: int = 0
    retransmissions: int = 0
    active_transfers: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    native_transfers: int = 0  # reads handed to the native data path (at OACK or ACK 0)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Session:
    """One request from one client TID, from its arrival to its end.

    ``io`` belongs to the transport (its socket, timer, file source...); this layer never
    looks at it."""

    __slots__ = ("client", "io", "opts", "path", "queued_at", "raw", "request", "state",
                 "xfer")  # fmt: skip

    def __init__(self, client: Client, raw: bytes, request: Request):
        self.client = client
        self.raw = raw
        self.request = request
        self.state = State.QUEUED
        self.queued_at = 0.0
        self.path = request.filename  # the normalised name once the file store resolved it
        self.opts: dict[str, str] = {}  # options acknowledged
        self.xfer: ReadTransfer | WriteTransfer | None = None
        self.io: object = None

    @property
    def peer_ip(self) -> str:
        return self.client[0]

    @property
    def is_read(self) -> bool:
        return self.request.opcode == core.RRQ

    def __repr__(self) -> str:
        return f"<Session {self.client} {self.path!r} {self.state.value}>"


@dataclass(slots=True)
class Arrival:
    """What one datagram on the listen socket asks of the transport, in this order."""

    supersedes: Session | None = None  # end this live session first (End.SUPERSEDED)
    reply: bytes | None = None  # an ERROR for the requester
    session: Session | None = None  # a new session, to place() once ``supersedes`` ended


@dataclass(slots=True)
class Step:
    """Sessions an event moved: admitted ones to prepare, refused ones to answer
    ``busy`` (already ended)."""

    start: list[Session] = field(default_factory=list)
    refused: list[Session] = field(default_factory=list)

    def __iadd__(self, other: Step) -> Step:
        self.start += other.start
        self.refused += other.refused
        return self


def busy_packet() -> bytes:
    return core.encode_error(core.ERR_UNDEFINED, BUSY_MESSAGE)


class Requests:
    """The live sessions, the admission queue and the request rules."""

    def __init__(self, limits: Limits, counters: Counters | None = None):
        self.limits = limits
        self.counters = counters if counters is not None else Counters()
        self.sessions: dict[Client, Session] = {}  # every session not ended, by client TID
        self._per_client: collections.Counter[str] = collections.Counter()
        self._active = 0
        self._queue: collections.deque[Session] = collections.deque()
        self._recent: dict[Client, tuple[bytes, float]] = {}  # TID -> (request, stale until)

    @property
    def active(self) -> int:
        """Sessions holding a slot."""
        return self._active

    # -- arrivals
    def receive(self, data: bytes, client: Client, now: float) -> Arrival:
        """One datagram on the listen socket."""
        c = self.counters
        try:
            pkt = core.parse_packet(data)
        except core.MalformedPacket:
            c.malformed += 1
            return Arrival()
        if not isinstance(pkt, Request):
            if isinstance(pkt, core.Error):
                return Arrival()
            return Arrival(reply=core.encode_error(core.ERR_ILLEGAL_OP, "illegal TFTP operation"))
        c.requests += 1
        arrival = Arrival()
        existing = self.sessions.get(client)
        if existing is not None:
            if existing.raw == data:
                c.duplicate_requests += 1
                return arrival
            c.superseded += 1
            arrival.supersedes = existing
        elif self._recent:
            recent = self._recent.get(client)
            if recent is not None and recent[0] == data and recent[1] > now:
                # A retransmitted request that sat in a queue while its transfer ran to
                # completion: starting it again would only time out against a client
                # that is done.
                c.duplicate_requests += 1
                return arrival
        if pkt.opcode == core.RRQ:
            c.read_requests += 1
        else:
            c.write_requests += 1
        if pkt.mode not in ("octet", "netascii"):
            c.request_errors += 1
            arrival.reply = core.encode_error(core.ERR_ILLEGAL_OP, f"unsupported mode {pkt.mode!r}")
        elif pkt.opcode == core.WRQ and not self.limits.uploads:
            c.request_errors += 1
            arrival.reply = core.encode_error(core.ERR_ACCESS, "access violation: uploads disabled")
        else:
            arrival.session = Session(client, bytes(data), pkt)
        return arrival

    def place(self, session: Session, now: float) -> Step:
        """Admit a new session, queue it, or refuse it (queue full)."""
        step = Step()
        if session.client in self.sessions:  # only after its predecessor has ended
            raise ValueError(f"{session.client} already has a live session")
        self.sessions[session.client] = session
        if self._can_admit(session.peer_ip):
            self._admit(session)
            step.start.append(session)
        elif len(self._queue) < self.limits.max_transfers:
            session.queued_at = now
            self.counters.queued += 1
            self._queue.append(session)
        else:
            self._refuse(session)
            step.refused.append(session)
        return step

    def _can_admit(self, ip: str) -> bool:
        return (self._active < self.limits.max_transfers
                and self._per_client[ip] < self.limits.max_per_client)  # fmt: skip

    def _admit(self, session: Session) -> None:
        session.state = State.PREPARING
        self._active += 1
        self._per_client[session.peer_ip] += 1
        self.counters.active_transfers = self._active

    def _refuse(self, session: Session) -> None:
        self.counters.busy_rejections += 1
        self._forget(session)

    def _forget(self, session: Session) -> None:
        if session.state in _HOLDS_SLOT:
            self._active -= 1
            self._per_client[session.peer_ip] -= 1
            if self._per_client[session.peer_ip] <= 0:
                del self._per_client[session.peer_ip]
            self.counters.active_transfers = self._active
        session.state = State.ENDED
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]

    def _drain_queue(self) -> Step:
        """Admit queued sessions while there are slots (FIFO, past those whose client is at
        its cap)."""
        step = Step()
        if not self._queue:
            return step
        keep: collections.deque[Session] = collections.deque()
        while self._queue and self._active < self.limits.max_transfers:
            s = self._queue.popleft()
            if s.state is not State.QUEUED:
                continue
            if self._per_client[s.peer_ip] < self.limits.max_per_client:
                self._admit(s)
                step.start.append(s)
            else:
                keep.append(s)
        keep.extend(self._queue)
        self._queue = keep
        return step

    def expire(self, now: float) -> Step:
        """Housekeeping: queued sessions that waited ``queue_wait`` are refused."""
        if self._recent:
            self._recent = {k: v for k, v in self._recent.items() if v[1] > now}
        step = Step()
        limit = now - self.limits.queue_wait
        q = self._queue
        while q and (q[0].state is not State.QUEUED or q[0].queued_at <= limit):
            s = q.popleft()
            if s.state is State.QUEUED:
                self._refuse(s)
                step.refused.append(s)
        return step

    # -- transfers
    def _negotiate(self, session: Session, opcode: int, **size: int) -> core.Negotiated:
        lim = self.limits
        try:
            neg = core.negotiate(
                session.request.options, opcode=opcode, max_blksize=lim.max_blksize,
                default_timeout=lim.default_timeout, max_windowsize=lim.max_windowsize, **size,
            )  # fmt: skip
        except core.OptionError as exc:
            raise RequestError(exc.code, f"option negotiation refused: {exc}") from None
        session.opts = neg.oack
        return neg

    def read_transfer(self, session: Session, source: Source) -> ReadTransfer:
        """Negotiate a read of ``source``; raises RequestError (ERROR 8) for bad options."""
        neg = self._negotiate(session, core.RRQ, file_size=source.size)
        session.xfer = ReadTransfer(source, blksize=neg.blksize, windowsize=neg.windowsize,
                                    timeout=neg.timeout, retries=self.limits.retries,
                                    oack=neg.oack or None)  # fmt: skip
        return session.xfer

    def write_transfer(self, session: Session) -> WriteTransfer:
        """Negotiate an upload; raises RequestError (ERROR 8, or 3 over the size limit)."""
        lim = self.limits
        neg = self._negotiate(session, core.WRQ, max_upload=lim.max_upload)
        session.xfer = WriteTransfer(blksize=neg.blksize, windowsize=neg.windowsize,
                                     timeout=neg.timeout, retries=lim.retries,
                                     oack=neg.oack or None, max_bytes=lim.max_upload)  # fmt: skip
        return session.xfer

    # -- endings
    def refuse(self, session: Session, error: RequestError) -> tuple[bytes, Step]:
        """A session whose request the file store (or negotiation) refused: its ERROR."""
        self.counters.request_errors += 1
        self._forget(session)
        return core.encode_error(error.code, error.message), self._drain_queue()

    def end(self, session: Session, now: float,
            failure: tuple[End, str] | None = None) -> tuple[TransferStats | None, Step]:  # fmt: skip
        """A session is over (its transfer ended, or it never got one).

        Frees its slot and counts its outcome; returns its stats (None without a transfer)
        and the queued sessions its slot admits.  ``failure`` overrides a transfer's own
        outcome (an upload that arrived but could not be stored)."""
        if session.state is State.ENDED:
            return None, Step()
        started = session.state in (State.RUNNING, State.NATIVE)
        self._forget(session)
        stats = None
        xfer = session.xfer
        if xfer is not None and started:  # one that ended while prepared has nothing to say
            if not xfer.done:  # the transport ends a transfer before the session
                raise ValueError(f"{session!r}: transfer still running")
            stats = self._account(session, xfer, now, failure)
        return stats, self._drain_queue()

    def _account(self, session: Session, xfer, now: float,
                 failure: tuple[End, str] | None) -> TransferStats:  # fmt: skip
        c = self.counters
        stats = self.stats(session, now)
        if failure is not None:
            stats.end, stats.error = failure
            stats.ok = False
        c.retransmissions += xfer.retransmissions
        if isinstance(xfer, ReadTransfer):
            c.bytes_sent += xfer.bytes_sent
            c.blocks_sent += xfer.blocks_sent
        else:
            c.bytes_received += xfer.bytes_received
        if stats.probe:
            c.probes_aborted += 1
        elif stats.ok:
            c.transfers_ok += 1
            self._recent[session.client] = (session.raw, now + STALE_REQUEST_WINDOW)
        else:
            c.transfers_failed += 1
        return stats

    def stop(self) -> list[Session]:
        """Every session not ended (the server is stopping); the queue is emptied."""
        live = list(self.sessions.values())
        for s in live:
            if s.state is State.QUEUED:
                self._forget(s)
        self._queue.clear()
        return [s for s in live if s.state is not State.ENDED]

    # -- what a session was
    @staticmethod
    def is_probe(session: Session) -> bool:
        """A size probe: a read with ``tsize`` that the client ended after the OACK."""
        xfer = session.xfer
        return (
            isinstance(xfer, ReadTransfer)
            and xfer.sent == 0
            and "tsize" in session.opts
            and xfer.end in (End.PEER_ERROR, End.SUPERSEDED)
        )

    def stats(self, session: Session, now: float) -> TransferStats:
        xfer = session.xfer
        duration = max(0.0, (xfer.finished or now) - xfer.started) if xfer.started else 0.0
        ip, port = session.client[0], session.client[1]
        if isinstance(xfer, ReadTransfer):
            size = xfer.source.size
            delivered = size if xfer.ok else min(xfer.acked * xfer.blksize, size)
            return TransferStats(
                ip, port, session.path, delivered, xfer.blocks_sent, xfer.retransmissions,
                duration, xfer.ok, xfer.error, "read", self.is_probe(session),
                dict(session.opts), xfer.end,
            )  # fmt: skip
        return TransferStats(
            ip, port, session.path, xfer.bytes_received, xfer.blocks, xfer.retransmissions,
            duration, xfer.ok, xfer.error, "write", False, dict(session.opts), xfer.end,
        )  # fmt: skip
