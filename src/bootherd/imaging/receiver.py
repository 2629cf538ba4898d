"""Sans-IO imaging receiver: join, fetch the index, collect symbols, decode, verify, write.

Driven like the server core: :meth:`Receiver.start`, :meth:`control` (datagrams from the
server), :meth:`data` (multicast datagrams), :meth:`index` and :meth:`http_chunk`
(answers to the transport's HTTP fetches) and :meth:`poll` (timers), each with an
explicit ``now``, each returning effects: :class:`Control` (a datagram for the server),
:class:`Listen` (join the session's group), :class:`FetchIndex`, :class:`FetchChunks`
(HTTP fallback), :class:`Write`, :class:`Zero`, :class:`Progress` and :class:`Finished`.

Nothing is written before it matched its chunk's SHA-256: a chunk that does not is
dropped whole and asked for again.  A chunk whose symbols stop arriving (the server
moved on, or the stream went quiet) is *settled*: only then does the receiver ask for
the symbols it still needs, so it never asks for what is still on its way.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import zstandard

from . import fec, wire
from .format import SKIPPED, Header, ImageError, chunk_ok, decode_header, unpack_chunk

UNTOUCHED, ACTIVE, SETTLED, DONE = 0, 1, 2, 3
RUN_LOST = 32  # a gap of this many datagrams or more is strain, not random loss
URGENT_BACKLOG, URGENT = 50, 0.1  # a buffer this % full is told at once, this often
GAP_SETTLE = 256  # a gap this far behind the newest datagram is final (late ones filled it)


class RunLoss:
    """Datagrams lost in runs, from DATA sequence numbers.  Datagrams can arrive out of
    order (the host's per-CPU queues), so a gap stays open until it is GAP_SETTLE behind
    the newest datagram and counts only what never came."""

    def __init__(self) -> None:
        self.seen = 0
        self.lost = 0
        self.gaps: list[list[int]] = []  # [first, length, still missing]

    def add(self, seq: int) -> None:
        if seq > self.seen:
            if self.seen and seq - self.seen - 1 >= RUN_LOST:
                self.gaps.append([self.seen + 1, seq - self.seen - 1, seq - self.seen - 1])
            self.seen = seq
            while self.gaps and (seq - sum(self.gaps[0][:2]) > GAP_SETTLE or len(self.gaps) > 32):
                missing = self.gaps.pop(0)[2]
                if missing >= RUN_LOST:
                    self.lost += missing
            return
        for g in self.gaps:
            if g[0] <= seq < g[0] + g[1]:
                g[2] -= 1
                return


@dataclass(frozen=True, slots=True)
class Control:
    data: bytes


@dataclass(frozen=True, slots=True)
class Listen:
    group: str
    port: int


@dataclass(frozen=True, slots=True)
class FetchIndex:
    header_len: int  # 0: unknown (no JOINED): read the fixed header first


@dataclass(frozen=True, slots=True)
class FetchChunks:
    chunks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Write:
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Zero:
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Progress:
    state: str  # joining | receiving | http | done | failed
    done: int
    chunks: int
    bytes_written: int
    via: str  # multicast | http


@dataclass(frozen=True, slots=True)
class Finished:
    ok: bool
    message: str
    image_sha256: bytes


Effect = Control | Listen | FetchIndex | FetchChunks | Write | Zero | Progress | Finished


@dataclass(slots=True)
class _Stripe:
    k: int
    sources: dict[int, bytes] = field(default_factory=dict)
    repairs: dict[int, bytes] = field(default_factory=dict)

    @property
    def have(self) -> int:
        return len(self.sources) + len(self.repairs)


@dataclass(slots=True)
class _Partial:
    layout: fec.Layout
    stripes: list[_Stripe]
    nbytes: int = 0

    @property
    def complete(self) -> bool:
        return all(s.have >= s.k for s in self.stripes)


@dataclass
class Stats:
    datagrams: int = 0
    useful: int = 0
    duplicates: int = 0
    malformed: int = 0
    foreign: int = 0  # well-formed, but not for this session or out of range
    bad_chunks: int = 0  # decoded to the wrong SHA-256: dropped, asked for again
    requests: int = 0
    http_chunks: int = 0
    dropped_memory: int = 0
    held: int = 0  # JOINs answered HOLD (a reload gathering its receivers)


class Receiver:
    def __init__(self, image: str, *, receiver_id: int | None = None, multicast: bool = True,
                 join_interval: float = 0.5, join_attempts: int = 10,
                 request_interval: float = 0.5, quiet: float = 0.05,
                 data_timeout: float = 3.0, stall_timeout: float = 15.0,
                 max_partial: int = 256 << 20, http_retries: int = 3,
                 rng: random.Random | None = None):
        self.image = image
        self.rng = rng or random.Random()
        self.id = receiver_id if receiver_id is not None else self.rng.getrandbits(32)
        self.multicast = multicast
        self.join_interval = join_interval
        self.join_attempts = join_attempts
        self.request_interval = request_interval
        self.quiet = quiet
        self.data_timeout = data_timeout
        self.stall_timeout = stall_timeout
        self.max_partial = max_partial
        self.http_retries = http_retries
        self.stats = Stats()
        self.state = "new"
        self.joined: wire.Joined | None = None
        self.header: Header | None = None
        self.nonce = self.rng.getrandbits(32)
        self.joins_sent = 0
        self.deadline: float | None = None
        self.chunk_state = bytearray()
        self.partial: dict[int, _Partial] = {}
        self.partial_bytes = 0
        self.current = -1
        self.done = 0
        self.needed = 0
        self.bytes_written = 0
        self.last_data = 0.0
        self.last_progress = 0.0
        self.next_request = 0.0
        self.asked_quiet = False
        self.any_data = False
        self.seen = 0  # highest DATA sequence number received
        # Feedback for the server's rate (wire.Feedback): DATA received, datagrams lost
        # in runs of RUN_LOST or more (a full buffer or ring; random loss seldom makes
        # them), and the fullest the socket buffer was since the last REQUEST.
        self.received = 0
        self.runs = RunLoss()
        self.backlog = 0
        self.urgent_at = float("-inf")
        self.socket_drops = 0
        self.http_failures: dict[int, int] = {}
        self.via = "multicast"
        self.fallback_reason = ""
        self.finished: Finished | None = None

    # ------------------------------------------------------------------ joining

    def start(self, now: float) -> list[Effect]:
        if not self.multicast:
            return self._fallback(now, "multicast disabled")
        self.state = "joining"
        return self._send_join(now)

    def _send_join(self, now: float) -> list[Effect]:
        self.joins_sent += 1
        self.deadline = now + self.join_interval
        return [Control(wire.encode(wire.Join(self.nonce, self.id, self.image))),
                self._progress()]

    def control(self, now: float, data: bytes) -> list[Effect]:
        try:
            m = wire.decode(data)
        except wire.Malformed:
            self.stats.malformed += 1
            return []
        if isinstance(m, wire.Joined) and self.state == "joining" and m.nonce == self.nonce:
            if m.image != self.image or m.block != fec.BLOCK:
                return self._fail("the server answered for another image or block size")
            if self.header is not None and m.image_sha256 != self.header.image_sha256:
                return self._fail("the image changed on the server while receiving it")
            if self.joined is not None and m.session != self.joined.session:
                self.seen = 0  # a new session numbers its datagrams afresh
            self.joined = m
            self.last_progress = self.last_data = now
            self.any_data = False
            if self.header is None:
                self.state = "index"
                self.deadline = None
                return [FetchIndex(m.header_len)]
            return self._begin(now)
        if isinstance(m, wire.Refused):
            mine = m.nonce == self.nonce if self.state == "joining" else (
                self.joined is not None and m.nonce == self.joined.session)
            if not mine:
                self.stats.foreign += 1
                return []
            if m.code == wire.UNKNOWN_SESSION and self.state == "receiving":
                self.state = "joining"  # the server restarted or ended the session
                self.nonce = self.rng.getrandbits(32)
                self.joins_sent = 0
                return self._send_join(now)
            if m.code == wire.HOLD and self.state == "joining":
                self.joins_sent = 0  # the session gathers its receivers: keep joining
                self.stats.held += 1
                return []
            if m.code == wire.BUSY:
                return self._fallback(now, f"server busy: {m.message}")
            return self._fail(f"refused by the server: {m.message}")
        self.stats.foreign += 1
        return []

    def index(self, now: float, meta: bytes | None, error: str = "") -> list[Effect]:
        """The header + index the transport fetched (over HTTP), or None and why not."""
        if self.state not in ("index", "http-index"):
            return []
        if meta is None:
            return self._fail(f"cannot fetch the image index: {error}")
        try:
            h = decode_header(meta)
        except ImageError as e:
            return self._fail(f"bad image index: {e}")
        if self.joined is not None and (h.meta_sha256 != self.joined.meta_sha256
                                        or h.image_sha256 != self.joined.image_sha256):
            return self._fail("the index does not match the digest the server announced")
        self.header = h
        self.chunk_state = bytearray(h.chunk_count)
        out: list[Effect] = []
        for c in h.chunks:
            if c.kind == SKIPPED:
                self.chunk_state[c.index] = DONE
                self.done += 1
                out.append(Zero(h.disk_offset(c.index), c.raw_len))
        self.needed = h.chunk_count - self.done
        if self.state == "http-index":
            self.state = "http"
            return out + self._fetch_missing(now)
        return out + self._begin(now)

    def _begin(self, now: float) -> list[Effect]:
        assert self.joined is not None
        self.state = "receiving"
        self.last_progress = self.last_data = now
        out: list[Effect] = [Listen(self.joined.group, self.joined.port)]
        if self.done == len(self.chunk_state):
            return out + self._complete()
        out += self._request(now)
        return out

    # ------------------------------------------------------------------ data

    def data(self, now: float, raw: bytes | memoryview) -> list[Effect]:
        st = self.stats
        st.datagrams += 1
        try:
            m = wire.decode(raw)
        except wire.Malformed:
            st.malformed += 1
            return []
        j, h = self.joined, self.header
        if not isinstance(m, wire.Data) or j is None or h is None or m.session != j.session \
                or self.state != "receiving":
            st.foreign += 1
            return []
        c = m.chunk
        if c >= h.chunk_count:
            st.foreign += 1
            return []
        self.last_data = now
        self.any_data = True
        self.received += 1
        self.runs.add(m.seq)
        if m.seq > self.seen:
            self.seen = m.seq
        self.asked_quiet = False
        state = self.chunk_state[c]
        if state == DONE:
            st.duplicates += 1
            return []
        if c != self.current:
            self._settle()
            self.current = c
        p = self.partial.get(c)
        if p is None:
            ch = h.chunks[c]
            if self.partial_bytes >= self.max_partial:
                st.dropped_memory += 1
                return []
            lay = fec.layout(ch.stored_len)
            p = self.partial[c] = _Partial(lay, [_Stripe(lay.k(s)) for s in range(lay.stripes)])
        lay = p.layout
        payload = bytes(m.payload)
        if m.repair:
            s, r = wire.split_symbol(m.symbol)
            if s >= lay.stripes or len(payload) != fec.BLOCK:
                st.foreign += 1
                return []
            stripe = p.stripes[s]
            if r in stripe.repairs or stripe.have >= stripe.k:
                st.duplicates += 1
                return []
            stripe.repairs[r] = payload
        else:
            b = m.symbol
            if b >= lay.blocks or len(payload) != lay.block_len(b):
                st.foreign += 1
                return []
            s, t = lay.stripe_of(b)
            stripe = p.stripes[s]
            if t in stripe.sources or stripe.have >= stripe.k:
                st.duplicates += 1
                return []
            stripe.sources[t] = payload
        st.useful += 1
        p.nbytes += len(payload)
        self.partial_bytes += len(payload)
        self.chunk_state[c] = ACTIVE
        if p.complete:
            return self._finish_chunk(now, c)
        return []

    def note_backlog(self, now: float, percent: int, drops: int = 0) -> list[Effect]:
        """The transport's look at the data socket: percent of its buffer in use, and
        datagrams the kernel dropped at it so far.  A buffer filling up is told at once
        (every URGENT s at most), so the server slows down before much is lost."""
        self.backlog = max(self.backlog, min(100, max(0, percent)))
        self.socket_drops = max(self.socket_drops, drops)
        if self.backlog < URGENT_BACKLOG or now - self.urgent_at < URGENT or \
                self.state != "receiving" or self.joined is None:
            return []
        self.urgent_at = now
        self.stats.requests += 1
        req = wire.Request(self.joined.session, self.id, self.done, self.seen, (), (),
                           self._feedback())
        return [Control(wire.encode(req))]

    def _feedback(self) -> wire.Feedback:
        lost = (self.runs.lost + self.socket_drops) & 0xFFFFFFFF
        fb = wire.Feedback(self.received & 0xFFFFFFFF, lost, self.backlog)
        self.backlog = 0
        return fb

    def _settle(self) -> None:
        c = self.current
        if c >= 0 and self.chunk_state and self.chunk_state[c] == ACTIVE:
            self.chunk_state[c] = SETTLED
        self.current = -1

    def _drop_partial(self, c: int) -> None:
        p = self.partial.pop(c, None)
        if p is not None:
            self.partial_bytes -= p.nbytes

    def _finish_chunk(self, now: float, c: int) -> list[Effect]:
        assert self.header is not None
        p = self.partial[c]
        lay = p.layout
        try:
            stripes = [fec.decode(s.k, s.sources, s.repairs) for s in p.stripes]
            stored = fec.assemble(lay, stripes)
        except ValueError:
            stored = b""
        self._drop_partial(c)
        if c == self.current:
            self.current = -1
        return self._accept(now, c, stored)

    def _accept(self, now: float, c: int, stored: bytes) -> list[Effect]:
        """Write a chunk whose stored bytes match the index, or drop it to ask again."""
        assert self.header is not None
        ch = self.header.chunks[c]
        data = None
        if chunk_ok(ch, stored):
            try:
                data = unpack_chunk(ch, stored)
            except (ImageError, zstandard.ZstdError):
                data = None
        if data is None:
            self.stats.bad_chunks += 1
            self.chunk_state[c] = UNTOUCHED
            return []
        self.chunk_state[c] = DONE
        self.done += 1
        self.bytes_written += len(data)
        self.last_progress = now
        out: list[Effect] = [Write(self.header.disk_offset(c), data)]
        if self.done == self.header.chunk_count:
            out += self._complete()
        return out

    # ------------------------------------------------------------------ asking

    def _request(self, now: float) -> list[Effect]:
        assert self.joined is not None and self.header is not None
        ranges: list[tuple[int, int]] = []
        cs = self.chunk_state
        n = len(cs)
        c = cs.find(UNTOUCHED)
        while 0 <= c < n and len(ranges) < wire.MAX_RANGES:
            end = c + 1
            while end < n and cs[end] == UNTOUCHED:
                end += 1
            ranges.append((c, end - c))
            c = cs.find(UNTOUCHED, end)
        needs: list[tuple[int, int, int]] = []
        for ci, p in self.partial.items():
            if cs[ci] != SETTLED:
                continue
            for s, stripe in enumerate(p.stripes):
                if stripe.have < stripe.k:
                    needs.append((ci, s, min(255, stripe.k - stripe.have)))
            if len(needs) >= wire.MAX_NEEDS:
                break
        self.next_request = now + self.request_interval * self.rng.uniform(0.75, 1.25)
        if not ranges and not needs:
            return [self._progress()]
        self.stats.requests += 1
        req = wire.Request(self.joined.session, self.id, self.done, self.seen, tuple(ranges),
                           tuple(needs[:wire.MAX_NEEDS]), self._feedback())
        return [Control(wire.encode(req)), self._progress()]

    # ------------------------------------------------------------------ timers

    def poll(self, now: float) -> tuple[list[Effect], float | None]:
        out: list[Effect] = []
        if self.state == "joining" and self.deadline is not None and now >= self.deadline:
            if self.joins_sent >= self.join_attempts:
                out += self._fallback(now, f"no answer from the imaging server after "
                                           f"{self.joins_sent} JOINs")
            else:
                out += self._send_join(now)
        elif self.state == "receiving":
            if not self.any_data and now - self.last_data >= self.data_timeout:
                out += self._fallback(now, f"no multicast data in {self.data_timeout:g} s "
                                           "(is multicast routed here?)")
            elif now - self.last_progress >= self.stall_timeout:
                out += self._fallback(now, f"no progress in {self.stall_timeout:g} s")
            else:
                quiet = now - self.last_data >= self.quiet
                if quiet:
                    self._settle()
                if now >= self.next_request or (quiet and not self.asked_quiet):
                    self.asked_quiet = quiet
                    out += self._request(now)
        return out, self.wakeup()

    def wakeup(self) -> float | None:
        """When :meth:`poll` wants to run next (after any event; None: never)."""
        if self.state == "joining":
            return self.deadline
        if self.state == "receiving":
            t = min(self.next_request, self.last_progress + self.stall_timeout)
            if not self.any_data:
                t = min(t, self.last_data + self.data_timeout)
            elif not self.asked_quiet:
                t = min(t, self.last_data + self.quiet)
            return t
        return None

    # ------------------------------------------------------------------ HTTP fallback

    def _fallback(self, now: float, why: str) -> list[Effect]:
        out: list[Effect] = []
        if self.joined is not None and self.state == "receiving":
            out.append(Control(wire.encode(wire.Leave(self.joined.session, self.id,
                                                      wire.LEFT_FALLBACK, self.done))))
        self.fallback_reason = why
        self.via = "http"
        for c in list(self.partial):
            self._drop_partial(c)
        if self.header is None:
            self.state = "http-index"
            return out + [FetchIndex(self.joined.header_len if self.joined else 0)]
        self.state = "http"
        return out + self._fetch_missing(now)

    def _fetch_missing(self, now: float) -> list[Effect]:
        missing = tuple(i for i, s in enumerate(self.chunk_state) if s != DONE)
        if not missing:
            return self._complete()
        return [FetchChunks(missing), self._progress()]

    def http_chunk(self, now: float, c: int, stored: bytes | None) -> list[Effect]:
        """A chunk's stored bytes as fetched over HTTP (None: the fetch failed)."""
        if self.state != "http" or self.header is None or not 0 <= c < len(self.chunk_state) \
                or self.chunk_state[c] == DONE:
            return []
        self.stats.http_chunks += 1
        out = self._accept(now, c, stored) if stored is not None else []
        if self.chunk_state[c] != DONE and self.finished is None:
            n = self.http_failures[c] = self.http_failures.get(c, 0) + 1
            if n > self.http_retries:
                return self._fail(f"chunk {c}: no intact copy after {n} HTTP fetches")
            return [FetchChunks((c,))]
        return out

    # ------------------------------------------------------------------ the end

    def _progress(self) -> Progress:
        n = len(self.chunk_state)
        return Progress(self.state, self.done, n, self.bytes_written, self.via)

    def _complete(self) -> list[Effect]:
        assert self.header is not None
        out: list[Effect] = []
        if self.joined is not None and self.state == "receiving":
            out.append(Control(wire.encode(wire.Leave(self.joined.session, self.id,
                                                      wire.LEFT_DONE, self.done))))
        self.state = "done"
        self.deadline = None
        self.finished = Finished(True, f"{self.done} chunks, {self.bytes_written} bytes "
                                       f"written ({self.via})", self.header.image_sha256)
        return out + [self._progress(), self.finished]

    def _fail(self, message: str) -> list[Effect]:
        out: list[Effect] = []
        if self.joined is not None and self.state == "receiving":
            out.append(Control(wire.encode(wire.Leave(self.joined.session, self.id,
                                                      wire.LEFT_FAILED, self.done))))
        self.state = "failed"
        self.deadline = None
        self.finished = Finished(False, message,
                                 self.header.image_sha256 if self.header else b"")
        return out + [self._progress(), self.finished]


def sha256_of(path: str, size: int) -> bytes:
    """SHA-256 of the first ``size`` bytes of a written disk (the final check)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size
        while left:
            piece = f.read(min(left, 4 << 20))
            if not piece:
                break
            h.update(piece)
            left -= len(piece)
    return h.digest()
