"""Sans-IO multicast server: sessions per image, receiver-driven, paced by a token bucket.

Nothing here touches a socket, a file or a clock.  The transport feeds datagrams and
timer ticks with an explicit ``now`` and carries out the effects returned:
:class:`Send` (datagrams to one address), :class:`OpenImage` (look an image up, then call
:meth:`Server.opened`) and :class:`Ended`.  Chunk bytes come from the
:class:`ImageSource` handed to :meth:`Server.opened`.

A session starts with the first JOIN for its image and ends when nobody has asked for
anything for ``idle_timeout`` (or its last receiver left with nothing queued).  Receivers
ask for what they miss: whole chunks (ranges) and, for chunks they hold in part, how
many more symbols each stripe needs.  The server keeps one work flag per chunk, so a
chunk wanted by 1,000 receivers is queued once; a cursor walks the flagged chunks in
order (a *pass*) and wraps, so late joiners and lossy receivers are served from the next
pass.  A whole chunk goes out as its source blocks plus a few repair symbols
(``fec_proactive``); a repair request is answered with fresh repair symbols, as many as
the neediest receiver asked for, which serve every receiver at once (imaging.fec).
"""

from __future__ import annotations

import random
import re
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Protocol

from . import fec, wire
from .format import SKIPPED, Header, chunk_ok

WAKE_BYTES = 64 * 1456  # the pacer sleeps until this much may be sent
# A session's own rate follows its receivers.  It starts at START of the cap and doubles
# every DOUBLING s until a receiver first shows strain (slow start: a receiver that
# cannot take the cap loses little before it is heard); then AIMD: a receiver that lost datagrams in
# runs (a full socket buffer, NIC ring or backlog queue), or whose socket buffer is more
# than STRAIN_BACKLOG % full and fuller than at its last report, slows it to DECREASE x,
# at most once per SLOW_HOLD s (reports of one overload count once).  A buffer that is
# full but draining holds the rate.  After CALM s without strain it speeds up by
# INCREASE of the cap per second, back to the cap.  Random loss (isolated datagrams)
# does not slow it: the erasure code repairs that cheaply.
STRAIN_BACKLOG = 50
BACKLOGGED = 5  # % of its socket buffer in use: a receiver has data it has not read yet
DECREASE = 0.75
SLOW_HOLD = 0.1
START = 1 / 8
DOUBLING = 0.15
CALM = 1.0
INCREASE = 0.05
MIN_RATE = 1 / 64  # of the cap: a stuck receiver cannot stop a session
# A session's bucket holds BURST_TIME s of its rate (2 to 64 datagrams) and the pacer
# wakes when half of it may go: bursts of about a millisecond.  A burst of b datagrams
# becomes b x N packets at once where one link fans out to N receivers (a switch's
# buffer; on one host the per-CPU backlog queue, 1,000 packets), so bursts stay short.
BURST_TIME = 0.002
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ImageSource(Protocol):
    header: Header

    def read(self, chunk: int) -> bytes: ...


@dataclass(slots=True)
class Send:
    addr: tuple[str, int]
    packets: list[bytes]


@dataclass(frozen=True, slots=True)
class OpenImage:
    image: str


@dataclass(frozen=True, slots=True)
class Ended:
    session: int
    image: str
    reason: str
    source: ImageSource | None = None  # the transport may close it now


Effect = Send | OpenImage | Ended


@dataclass(slots=True)
class ReceiverInfo:
    receiver: int
    addr: tuple[str, int]
    joined: float
    last_seen: float
    done: int = 0
    requests: int = 0
    mark: int = 0  # the session's last sent seq when this receiver last asked
    received: int = 0  # its feedback (wire.Feedback), as last reported
    lost: int = 0
    backlog: int = 0


@dataclass(slots=True)
class Gather:
    """An image's next session waits for `expected` receivers (the nodes a reload
    order named) until `until`; the JOINs held meanwhile, by receiver."""

    expected: int
    until: float
    held: dict[int, tuple[tuple[str, int], wire.Join]] = field(default_factory=dict)


class Damaged(Exception):
    """A chunk read from the image does not match its digest."""


@dataclass
class Session:
    id: int
    image: str
    source: ImageSource
    group: str
    port: int
    started: float
    last_activity: float
    receivers: dict[int, ReceiverInfo] = field(default_factory=dict)
    left: Counter = field(default_factory=Counter)  # how receivers left: done, fallback, ...
    bytes_sent: int = 0
    packets_sent: int = 0
    repair_packets: int = 0
    chunks_sent: int = 0
    passes: int = 0
    cursor: int = 0
    queue: deque = field(default_factory=deque)
    rate: float = 0.0  # bytes/s this session may send now (0: only the shared bucket)
    tokens: float = 0.0
    tokens_at: float | None = None
    slowed_at: float = float("-inf")
    strained_at: float = float("-inf")  # last time a receiver reported strain
    slowdowns: int = 0
    slow_start: bool = True

    def __post_init__(self) -> None:
        n = self.header.chunk_count
        self.pending = bytearray(n)  # 1: something of this chunk is to be sent
        self.whole = bytearray(n)  # 1: the whole chunk is wanted
        self.repairs: dict[int, dict[int, int]] = {}  # chunk -> stripe -> symbols needed
        self.rotation: dict[tuple[int, int], int] = {}  # (chunk, stripe) -> next symbol
        self.seq = 1  # of the next datagram queued
        self.sent_seq = 0  # of the last datagram handed to the network
        self.whole_end = [0] * n  # seq of the last datagram of each chunk's last whole burst
        self.extra_seqs: dict[tuple[int, int], list[int]] = {}  # repair bursts' seqs
        self.sendable = bytearray(0 if c.kind == SKIPPED else 1 for c in self.header.chunks)
        self.verified = bytearray(n)
        self.layouts: dict[int, fec.Layout] = {}
        # (last seq, chunk) of recent whole bursts, in sending order
        self.whole_bursts: deque[tuple[int, int]] = deque(maxlen=4096)

    @property
    def header(self) -> Header:
        return self.source.header

    def in_flight(self, seen: int) -> list[int]:
        """Chunks whose last whole burst a receiver that saw up to ``seen`` cannot have
        had yet (queued or on the wire): its request crossed them."""
        out = []
        for end, c in reversed(self.whole_bursts):
            if end <= seen:
                break
            out.append(c)
        return out

    @property
    def busy(self) -> bool:
        return bool(self.queue) or self.pending.find(1) >= 0

    def layout(self, c: int) -> fec.Layout:
        lay = self.layouts.get(c)
        if lay is None:
            lay = self.layouts[c] = fec.layout(self.header.chunks[c].stored_len)
        return lay

    def info(self, now: float) -> dict:
        return {
            "session": self.id, "image": self.image, "group": self.group, "port": self.port,
            "age": round(now - self.started, 3), "chunks": self.header.chunk_count,
            "queued_chunks": self.pending.count(1), "passes": self.passes,
            "bytes_sent": self.bytes_sent, "packets_sent": self.packets_sent,
            "repair_packets": self.repair_packets, "chunks_sent": self.chunks_sent,
            "left": dict(self.left), "rate_bytes": round(self.rate), "slowdowns": self.slowdowns,
            "receivers": [{"receiver": r.receiver, "address": r.addr[0], "port": r.addr[1],
                           "done_chunks": r.done, "requests": r.requests,
                           "joined": round(now - r.joined, 3), "received": r.received,
                           "lost": r.lost, "backlog": r.backlog,
                           "last_seen": round(now - r.last_seen, 3)}
                          for r in self.receivers.values()],
        }


class Server:
    def __init__(self, *, group: str, ports: range, http_port: int = 0, rate: float = 0.0,
                 burst: int = 256 * 1024, fec_proactive: float = 0.03,
                 idle_timeout: float = 10.0, receiver_timeout: float = 15.0,
                 max_sessions: int = 16, min_receivers: int = 1, gather_timeout: float = 60.0,
                 adapt_rate: bool = True,
                 counters: Counter | None = None, rng: random.Random | None = None):
        """``rate`` in bytes per second for all sessions together (0: unpaced).
        ``min_receivers``: a new session waits for that many receivers, at most
        ``gather_timeout`` s, before it sends (udp-sender's --min-receivers).
        ``adapt_rate``: each session's rate follows its receivers' feedback."""
        if not ports:
            raise ValueError("no multicast ports")
        self.group = group
        self.ports = ports
        self.http_port = http_port
        self.rate = float(rate)
        self.burst = max(int(burst), wire.MAX_DATAGRAM)
        self.fec_proactive = fec_proactive
        self.idle_timeout = idle_timeout
        self.receiver_timeout = receiver_timeout
        self.max_sessions = max_sessions
        self.min_receivers = min_receivers
        self.gather_timeout = gather_timeout
        self.adapt_rate = adapt_rate and self.rate > 0
        self.counters: Counter = counters if counters is not None else Counter()
        self.rng = rng or random.Random()
        self.sessions: dict[int, Session] = {}
        self.by_image: dict[str, Session] = {}
        self.opening: dict[str, list[tuple[tuple[str, int], wire.Join]]] = {}
        self.gathers: dict[str, Gather] = {}
        self.tokens = float(self.burst)
        self.tokens_at: float | None = None
        self._turn = 0

    # ------------------------------------------------------------------ control

    def datagram(self, now: float, addr: tuple[str, int], data: bytes) -> list[Effect]:
        try:
            m = wire.decode(data)
        except wire.Malformed:
            self.counters["malformed"] += 1
            return []
        if isinstance(m, wire.Join):
            return self._join(now, addr, m)
        if isinstance(m, wire.Request):
            return self._request(now, addr, m)
        if isinstance(m, wire.Leave):
            return self._leave(now, m)
        self.counters["unexpected"] += 1  # a server message sent to the server
        return []

    def expect(self, image: str, now: float, until: float) -> None:
        """One more receiver is coming for `image` (a node was ordered to reload with
        it): its next session starts once they have all joined, or at `until`, so
        nodes that boot a few seconds apart share one pass instead of each costing a
        part of the image again.  A session already running is joined as it is."""
        if image in self.by_image or until <= now:
            return
        g = self.gathers.get(image)
        if g is None or g.until <= now:
            g = self.gathers[image] = Gather(0, until)
        g.expected += 1
        g.until = max(g.until, until)

    def _gather(self, now: float, addr: tuple[str, int], m: wire.Join) -> list[Effect] | None:
        """Hold a JOIN while its image's session gathers receivers (None: go on)."""
        g = self.gathers.get(m.image)
        if g is None:
            return None
        g.held[m.receiver] = (addr, m)
        if len(g.held) < g.expected and now < g.until:
            self.counters["joins_held"] += 1
            return [Send(addr, [wire.encode(wire.Refused(
                m.nonce, wire.HOLD, f"gathering receivers: {len(g.held)} of {g.expected}"))])]
        del self.gathers[m.image]
        held = [w for r, w in g.held.items() if r != m.receiver]
        self.opening[m.image] = [*held, (addr, m)]  # all answered together once open
        return [OpenImage(m.image)]

    def _refuse(self, addr: tuple[str, int], nonce: int, code: int, msg: str) -> Send:
        self.counters["refused"] += 1
        return Send(addr, [wire.encode(wire.Refused(nonce, code, msg))])

    def _joined(self, s: Session, addr: tuple[str, int], m: wire.Join, now: float) -> Send:
        r = s.receivers.get(m.receiver)
        if r is None:
            s.receivers[m.receiver] = ReceiverInfo(m.receiver, addr, now, now)
        else:
            r.addr, r.last_seen = addr, now
        s.last_activity = now
        h = s.header
        return Send(addr, [wire.encode(wire.Joined(
            m.nonce, s.id, s.group, s.port, self.http_port, h.chunk_size, h.chunk_count,
            fec.BLOCK, 0, h.disk_size, h.header_len, h.meta_sha256, h.image_sha256, s.image))])

    def _join(self, now: float, addr: tuple[str, int], m: wire.Join) -> list[Effect]:
        self.counters["joins"] += 1
        if not NAME.fullmatch(m.image):
            return [self._refuse(addr, m.nonce, wire.UNKNOWN_IMAGE, f"no image {m.image!r}")]
        s = self.by_image.get(m.image)
        if s is not None:
            return [self._joined(s, addr, m, now)]
        waiting = self.opening.get(m.image)
        if waiting is not None:
            if all(w[0] != addr or w[1].receiver != m.receiver for w in waiting):
                waiting.append((addr, m))
            return []
        if len(self.sessions) + len(self.opening) >= self.max_sessions:
            return [self._refuse(addr, m.nonce, wire.BUSY,
                                 f"{self.max_sessions} sessions running (imaging.max_sessions)")]
        if self.min_receivers > 1 and m.image not in self.gathers and self.gather_timeout > 0:
            self.gathers[m.image] = Gather(self.min_receivers, now + self.gather_timeout)
        held = self._gather(now, addr, m)
        if held is not None:
            return held
        self.opening[m.image] = [(addr, m)]
        return [OpenImage(m.image)]

    def opened(self, now: float, image: str, source: ImageSource | None,
               error: str = "") -> list[Effect]:
        """The transport's answer to OpenImage: the image, or None and why not."""
        waiters = self.opening.pop(image, [])
        if source is None:
            code = wire.BAD_IMAGE if error.startswith("damaged") else wire.UNKNOWN_IMAGE
            return [self._refuse(a, j.nonce, code, error or f"no image {image!r}")
                    for a, j in waiters]
        used = {s.port for s in self.sessions.values()}
        port = next((p for p in self.ports if p not in used), None)
        if port is None:
            return [self._refuse(a, j.nonce, wire.BUSY, "no free multicast port "
                                 "(imaging.multicast_ports)") for a, j in waiters]
        sid = self.rng.getrandbits(32) or 1
        while sid in self.sessions:
            sid = self.rng.getrandbits(32) or 1
        s = Session(sid, image, source, self.group, port, now, now,
                    rate=self.rate * START if self.adapt_rate else self.rate,
                    tokens=0.0, tokens_at=now)
        self.sessions[sid] = s
        self.by_image[image] = s
        self.counters["sessions_started"] += 1
        return [self._joined(s, a, j, now) for a, j in waiters]

    def _request(self, now: float, addr: tuple[str, int], m: wire.Request) -> list[Effect]:
        s = self.sessions.get(m.session)
        if s is None:
            self.counters["unknown_session"] += 1
            return [self._refuse(addr, m.session, wire.UNKNOWN_SESSION,
                                 "no such session: join again")]
        self.counters["requests"] += 1
        r = s.receivers.get(m.receiver)
        if r is None:  # joined before a JOINED was lost, or we expired it: count it back in
            r = s.receivers[m.receiver] = ReceiverInfo(m.receiver, addr, now, now)
        r.addr, r.last_seen, r.done = addr, now, m.done
        r.requests += 1
        s.last_activity = now
        if m.feedback is not None:
            self._feedback(now, s, r, m.feedback)
        h = s.header
        n = h.chunk_count
        # What was sent before this receiver's previous request had a request interval
        # to arrive: if it has not seen it, it lost it.  Only what is newer may still be
        # on its way (or queued), so only that is subtracted from what it asks for.
        # A receiver whose socket buffer holds data (its feedback says so) has not read
        # what is queued there yet: only what it saw counts.  Feedback-only REQUESTs
        # (nothing asked) do not restart the interval.
        backlogged = m.feedback is not None and m.feedback.backlog >= BACKLOGGED
        seen = m.seen if backlogged else max(m.seen, r.mark)
        if m.ranges or m.needs:
            r.mark = s.sent_seq
        crossed = s.in_flight(seen)
        for first, count in m.ranges:
            if first >= n or count == 0 or count > n - first:
                self.counters["bad_request_entries"] += 1
                continue
            end = first + count
            wanted = bytearray(s.sendable[first:end])
            for c in crossed:
                if first <= c < end:
                    wanted[c - first] = 0
            _or_into(s.whole, first, wanted)
            _or_into(s.pending, first, wanted)
        for c, stripe, need in m.needs:
            if c >= n or h.chunks[c].kind == SKIPPED or stripe >= s.layout(c).stripes \
                    or need == 0 or need > s.layout(c).k(stripe):
                self.counters["bad_request_entries"] += 1
                continue
            if s.whole[c] or s.whole_end[c] > seen:
                continue  # all of it is queued, or on its way to this receiver
            # Symbols of this stripe sent after what the receiver had seen are on their way.
            coming = sum(1 for q in s.extra_seqs.get((c, stripe), ()) if q > seen)
            need -= coming
            if need <= 0:
                continue
            want = s.repairs.setdefault(c, {})
            if need > want.get(stripe, 0):
                want[stripe] = need
            s.pending[c] = 1
        return []

    def _feedback(self, now: float, s: Session, r: ReceiverInfo, fb: wire.Feedback) -> None:
        """Slow the session down when this receiver is not keeping up."""
        lost = max(0, fb.lost - r.lost)
        took = max(0, fb.received - r.received)
        filling = fb.backlog >= STRAIN_BACKLOG and fb.backlog > r.backlog
        strained = lost or fb.backlog >= STRAIN_BACKLOG
        r.received, r.lost, r.backlog = fb.received, fb.lost, fb.backlog
        if not self.adapt_rate or not strained:
            return
        s.strained_at = now
        s.slow_start = False
        if (lost or filling) and now - s.slowed_at >= SLOW_HOLD:
            s.slowed_at = now
            # It took in `took` of `took + lost`: about what it can, at this rate.
            factor = min(DECREASE, 0.9 * took / (took + lost)) if lost else DECREASE
            s.rate = max(self.rate * MIN_RATE, s.rate * factor)
            s.slowdowns += 1
            self.counters["rate_decreases"] += 1

    def _leave(self, now: float, m: wire.Leave) -> list[Effect]:
        s = self.sessions.get(m.session)
        if s is None:
            self.counters["unknown_session"] += 1
            return []
        self.counters["leaves"] += 1
        if s.receivers.pop(m.receiver, None) is not None:
            s.left[{wire.LEFT_DONE: "done", wire.LEFT_FALLBACK: "fallback"}.get(
                m.status, "failed")] += 1
        s.last_activity = now
        if not s.receivers:  # what is still queued is for nobody
            return [self._end(s, "last receiver left")]
        return []

    def _end(self, s: Session, reason: str) -> Ended:
        del self.sessions[s.id]
        del self.by_image[s.image]
        self.counters["sessions_ended"] += 1
        return Ended(s.id, s.image, reason, s.source)

    def end_all(self, reason: str) -> list[Effect]:
        """End every session (the server is stopping)."""
        return [self._end(s, reason) for s in list(self.sessions.values())]

    # ------------------------------------------------------------------ sending

    def _burst(self, s: Session, c: int, now: float) -> None:
        """Queue chunk c's datagrams: all of it, or the repair symbols asked for."""
        s.pending[c] = 0
        whole = s.whole[c]
        s.whole[c] = 0
        wants = s.repairs.pop(c, {})
        ch = s.header.chunks[c]
        if ch.kind == SKIPPED:
            return
        stored = s.source.read(c)
        if not s.verified[c]:
            if not chunk_ok(ch, stored):
                raise Damaged(f"damaged image: chunk {c} does not match its SHA-256")
            s.verified[c] = 1
        lay = s.layout(c)
        B = fec.BLOCK
        s.chunks_sent += 1
        if whole:
            for b in range(lay.blocks):
                self._queue(s, c, b, stored[b * B:(b + 1) * B])
            extra = self.fec_proactive
            for st in range(lay.stripes):
                r = min(fec.R_MAX, -(-int(lay.k(st) * extra * 1000) // 1000)) if extra else 0
                s.rotation[(c, st)] = r
                s.extra_seqs.pop((c, st), None)
                if r:
                    self._repairs(s, c, lay, st, stored, list(range(r)))
            s.whole_end[c] = s.seq - 1
            s.whole_bursts.append((s.seq - 1, c))
            return
        for st, need in sorted(wants.items()):
            seqs = s.extra_seqs.setdefault((c, st), [])
            pos = s.rotation.get((c, st), 0)
            k = lay.k(st)
            cycle = fec.R_MAX + k
            reps: list[int] = []
            for i in range(need):
                p = (pos + i) % cycle
                if p < fec.R_MAX:
                    reps.append(p)
                else:  # every repair symbol has been used: send sources again
                    b = lay.block_of(st, p - fec.R_MAX)
                    seqs.append(s.seq)
                    self._queue(s, c, b, stored[b * B:(b + 1) * B])
            s.rotation[(c, st)] = (pos + need) % cycle
            if reps:
                seqs.extend(range(s.seq, s.seq + len(reps)))
                self._repairs(s, c, lay, st, stored, reps)
            del seqs[:-2 * fec.R_MAX]

    def _queue(self, s: Session, c: int, symbol: int, payload: bytes) -> None:
        s.queue.append(wire.data_header(s.id, c, s.seq, symbol) + payload)
        s.seq += 1

    def _repairs(self, s: Session, c: int, lay: fec.Layout, st: int, stored: bytes,
                 reps: list[int]) -> None:
        symbols = fec.encode_stripe(stored, lay, st, reps)
        for j, sym in zip(reps, symbols, strict=True):
            self._queue(s, c, wire.repair_symbol(st, j), sym)
            s.repair_packets += 1
        self.counters["repair_packets"] += len(reps)

    def _next_chunk(self, s: Session) -> int:
        c = s.pending.find(1, s.cursor)
        if c < 0:
            c = s.pending.find(1, 0, s.cursor)
            if c < 0:
                return -1
            s.passes += 1
        s.cursor = c + 1
        return c

    def poll(self, now: float) -> tuple[list[Effect], float | None]:
        """Send what the token bucket allows, end idle sessions; the next deadline."""
        effects: list[Effect] = []
        self._expire(now, effects)
        if self.rate > 0:
            if self.tokens_at is not None:
                self.tokens = min(float(self.burst), self.tokens + (now - self.tokens_at) * self.rate)
            self.tokens_at = now
        order = list(self.sessions.values())
        if order:
            self._turn = (self._turn + 1) % len(order)
            order = order[self._turn:] + order[:self._turn]
        waiting = False
        wake = float("inf")
        for s in order:
            if self.adapt_rate:
                self._refill(now, s)
            batch: list[bytes] = []
            try:
                while True:
                    if not s.queue:
                        c = self._next_chunk(s)
                        if c < 0:
                            break
                        self._burst(s, c, now)
                        continue
                    size = len(s.queue[0])
                    if self.rate > 0 and self.tokens < size:
                        waiting = True
                        break
                    if self.adapt_rate and s.tokens < size:
                        # its own bucket: wake when half of it may go, at its rate
                        wake = min(wake, now + max(0.0, self._depth(s) / 2 - s.tokens) / s.rate)
                        break
                    batch.append(s.queue.popleft())
                    self.tokens -= size
                    s.tokens -= size
                    if self.rate <= 0 and len(batch) >= 256:
                        waiting = True  # unpaced: yield to the loop every 256 datagrams
                        break
            except Damaged as e:
                self.counters["damaged_chunks"] += 1
                for r in s.receivers.values():
                    effects.append(self._refuse(r.addr, s.id, wire.BAD_IMAGE, str(e)))
                effects.append(self._end(s, str(e)))
                continue
            if batch:
                s.sent_seq = int.from_bytes(batch[-1][12:16], "big")
                s.packets_sent += len(batch)
                nbytes = sum(map(len, batch))
                s.bytes_sent += nbytes
                self.counters["data_packets"] += len(batch)
                self.counters["data_bytes"] += nbytes
                effects.append(Send((s.group, s.port), batch))
        if waiting:
            if self.rate <= 0:
                return effects, now
            # Wake when a batch is due, not a datagram: one timer per ~64 datagrams.
            deficit = min(self.burst, WAKE_BYTES) - self.tokens
            wake = min(wake, now + max(deficit, 0.0) / self.rate)
        if wake < float("inf"):
            return effects, wake
        return effects, self._next_timer(now)

    def _refill(self, now: float, s: Session) -> None:
        """The session's own bucket, and its rate back up once its receivers are calm."""
        dt = now - s.tokens_at if s.tokens_at is not None else 0.0
        s.tokens_at = now
        if s.rate < self.rate and s.slow_start:
            s.rate = min(self.rate, s.rate * 2 ** (dt / DOUBLING))
        elif s.rate < self.rate and now - s.strained_at >= CALM:
            s.rate = min(self.rate, s.rate + self.rate * INCREASE * dt)
        s.tokens = min(self._depth(s), s.tokens + dt * s.rate)

    def _depth(self, s: Session) -> float:
        return min(float(self.burst), max(2.0 * wire.MAX_DATAGRAM,
                                          min(float(WAKE_BYTES), s.rate * BURST_TIME)))

    def _expire(self, now: float, effects: list[Effect]) -> None:
        for s in list(self.sessions.values()):
            for r in [r for r in s.receivers.values()
                      if now - r.last_seen >= self.receiver_timeout]:
                del s.receivers[r.receiver]
                s.left["expired"] += 1
                self.counters["receivers_expired"] += 1
            if not s.busy and now - s.last_activity >= self.idle_timeout:
                effects.append(self._end(s, f"idle for {self.idle_timeout:g} s"))

    def _next_timer(self, now: float) -> float | None:
        times = []
        for s in self.sessions.values():
            times.append(s.last_activity + self.idle_timeout)
            times += [r.last_seen + self.receiver_timeout for r in s.receivers.values()]
        return min(times) if times else None

    def info(self, now: float) -> list[dict]:
        return [s.info(now) for s in self.sessions.values()]


def _or_into(dst: bytearray, start: int, flags: bytes | bytearray) -> None:
    """dst[start:start+len(flags)] |= flags, for 0/1 flag bytes (one C-speed pass)."""
    n = len(flags)
    if n:
        merged = int.from_bytes(dst[start:start + n], "big") | int.from_bytes(flags, "big")
        dst[start:start + n] = merged.to_bytes(n, "big")


def mbit_to_bytes(rate_mbps: float) -> float:
    return rate_mbps * 1e6 / 8
