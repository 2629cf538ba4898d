"""Sans-IO TFTP core: packet codec, option negotiation and per-transfer state machines.

Nothing in this module touches a socket or a clock.  State machines are driven with
events ("packet received", "timer fired") that carry an explicit ``now`` and answer
with the packets to send and the next deadline (``None`` once the transfer is over).

Supported: RFC 1350 (octet, netascii), RFC 2347 (option extension), RFC 2348 (blksize),
RFC 2349 (timeout, tsize) and RFC 7440 (windowsize).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Protocol

# --------------------------------------------------------------------------- constants

RRQ, WRQ, DATA, ACK, ERROR, OACK = 1, 2, 3, 4, 5, 6

ERR_UNDEFINED = 0
ERR_NOT_FOUND = 1
ERR_ACCESS = 2
ERR_DISK_FULL = 3
ERR_ILLEGAL_OP = 4
ERR_UNKNOWN_TID = 5
ERR_FILE_EXISTS = 6
ERR_NO_USER = 7
ERR_OPTIONS = 8

MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
DEFAULT_BLKSIZE = 512
MAX_WINDOWSIZE = 65535
MAX_TIMEOUT = 255
MAX_BACKOFF_SHIFT = 3  # retransmission interval: timeout * 2**min(attempt, 3)

_HDR = struct.Struct("!HH")
_OP = struct.Struct("!H")

# Pre-built DATA headers for every 16-bit block number: the per-block hot path only
# concatenates a header with a memoryview slice of the payload.
_DATA_HEADERS: tuple[bytes, ...] = tuple(_HDR.pack(DATA, n) for n in range(65536))
_ACK_PACKETS: tuple[bytes, ...] = tuple(_HDR.pack(ACK, n) for n in range(65536))


class MalformedPacket(ValueError):
    """The bytes are not a valid TFTP packet."""


class End(enum.Enum):
    """Why a transfer ended.  The values are the names the native data path reports its
    outcomes by (``bootherd._tftpdata.OUTCOMES``)."""

    COMPLETED = "completed"
    PEER_ERROR = "peer_error"  # the client sent an ERROR (a probe's ERROR 8, say)
    TIMEOUT = "timeout"  # retransmissions used up
    UNEXPECTED = "unexpected"  # a packet the transfer cannot take (answered with ERROR 4)
    FILE_CHANGED = "file_changed"  # the file shrank or was swapped under the transfer
    UPLOAD_TOO_LARGE = "upload_too_large"
    SUPERSEDED = "superseded"  # the same client TID asked for something else
    STOPPING = "stopping"  # the server is stopping
    INTERNAL = "internal"  # a bug or an I/O error on our side
    STORE_FAILED = "store_failed"  # an upload arrived but could not be written


class SourceChanged(Exception):
    """Raised by a :class:`Source` whose bytes no longer match the size it announced."""


# --------------------------------------------------------------------------- packets


@dataclass(frozen=True, slots=True)
class Request:
    opcode: int  # RRQ or WRQ
    filename: str
    mode: str  # lower-case
    options: dict[str, str]  # lower-case names, first occurrence wins, order kept


@dataclass(frozen=True, slots=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    block: int


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class OAck:
    options: dict[str, str]


Packet = Request | Data | Ack | Error | OAck


def _decode(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _encode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _split_strings(body: bytes) -> list[bytes]:
    if not body or body[-1] != 0:
        raise MalformedPacket("strings not NUL-terminated")
    return body[:-1].split(b"\0")


def parse_packet(data: bytes | bytearray | memoryview) -> Packet:
    """Decode one datagram; raises :class:`MalformedPacket` for anything invalid."""
    data = bytes(data)
    if len(data) < 4:
        # A 2-byte opcode plus at least a 2-byte field is the minimum for every type.
        raise MalformedPacket("short packet")
    (op,) = _OP.unpack_from(data)
    if op == DATA:
        return Data(_OP.unpack_from(data, 2)[0], data[4:])
    if op == ACK:
        # Some clients pad ACKs; accept trailing bytes leniently only if all zero.
        if len(data) != 4 and any(data[4:]):
            raise MalformedPacket("ACK with trailing garbage")
        return Ack(_OP.unpack_from(data, 2)[0])
    if op == ERROR:
        code = _OP.unpack_from(data, 2)[0]
        msg = data[4:]
        nul = msg.find(b"\0")
        if nul >= 0:
            msg = msg[:nul]  # tolerate missing terminator and trailing junk
        return Error(code, msg.decode("utf-8", "replace"))
    if op in (RRQ, WRQ):
        parts = _split_strings(data[2:])
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise MalformedPacket("request without filename or mode")
        filename, mode, rest = parts[0], parts[1], parts[2:]
        if len(rest) % 2:
            # A trailing option name without value: some firmware pads with an extra NUL.
            if rest[-1] != b"":
                raise MalformedPacket("option without value")
            rest = rest[:-1]
        options: dict[str, str] = {}
        for i in range(0, len(rest), 2):
            name = _decode(rest[i]).lower()
            if not name:
                if rest[i + 1]:
                    raise MalformedPacket("empty option name")
                continue  # padding NULs
            options.setdefault(name, _decode(rest[i + 1]))
        try:
            mode_s = mode.decode("ascii").lower()
        except UnicodeDecodeError:
            raise MalformedPacket("non-ASCII mode") from None
        return Request(op, _decode(filename), mode_s, options)
    if op == OACK:
        parts = _split_strings(data[2:])
        if len(parts) % 2:
            raise MalformedPacket("OACK option without value")
        opts = {_decode(parts[i]).lower(): _decode(parts[i + 1]) for i in range(0, len(parts), 2)}
        return OAck(opts)
    raise MalformedPacket(f"unknown opcode {op}")


def encode_request(
    opcode: int, filename: str, mode: str = "octet", options: dict[str, str] | None = None
) -> bytes:
    out = [_OP.pack(opcode), _encode(filename), b"\0", mode.encode("ascii"), b"\0"]
    for k, v in (options or {}).items():
        out += [_encode(k), b"\0", _encode(str(v)), b"\0"]
    return b"".join(out)


def encode_data(block: int, payload: bytes | memoryview) -> bytes:
    return _DATA_HEADERS[block & 0xFFFF] + payload


def encode_ack(block: int) -> bytes:
    return _ACK_PACKETS[block & 0xFFFF]


def encode_error(code: int, message: str) -> bytes:
    return _HDR.pack(ERROR, code) + message.encode("utf-8", "replace") + b"\0"


def encode_oack(options: dict[str, str]) -> bytes:
    out = [_OP.pack(OACK)]
    for k, v in options.items():
        out += [_encode(k), b"\0", _encode(str(v)), b"\0"]
    return b"".join(out)


def encode(packet: Packet) -> bytes:
    if isinstance(packet, Request):
        return encode_request(packet.opcode, packet.filename, packet.mode, packet.options)
    if isinstance(packet, Data):
        return encode_data(packet.block, packet.payload)
    if isinstance(packet, Ack):
        return encode_ack(packet.block)
    if isinstance(packet, Error):
        return encode_error(packet.code, packet.message)
    return encode_oack(packet.options)


# --------------------------------------------------------------------------- netascii


def to_netascii(data: bytes) -> bytes:
    """Host (LF) text to netascii: LF -> CR LF, bare CR -> CR NUL."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def from_netascii(data: bytes) -> bytes:
    """Netascii back to host text: CR LF -> LF, CR NUL -> CR."""
    return data.replace(b"\r\n", b"\n").replace(b"\r\0", b"\r")


# --------------------------------------------------------------------------- options


class OptionError(Exception):
    """A known option carries a value we refuse; ``code`` is the ERROR to answer with (8,
    or 3 for an announced upload over the limit)."""

    def __init__(self, message: str, code: int = ERR_OPTIONS):
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Negotiated:
    blksize: int = DEFAULT_BLKSIZE
    timeout: float = 1.0
    windowsize: int = 1
    tsize: int | None = None
    oack: dict[str, str] = field(default_factory=dict)  # what goes into the OACK


def _int_option(name: str, value: str, lo: int, hi: int) -> int:
    try:
        n = int(value.strip(), 10)
    except ValueError:
        raise OptionError(f"{name}: not a number") from None
    if n < lo or n > hi:
        raise OptionError(f"{name}: {n} out of range {lo}..{hi}")
    return n


def negotiate(
    options: dict[str, str],
    *,
    opcode: int = RRQ,
    max_blksize: int = 1468,
    default_timeout: float = 1.0,
    max_windowsize: int = 64,
    file_size: int | None = None,
    max_upload: int | None = None,
) -> Negotiated:
    """Apply RFC 2347/2348/2349/7440 to the request options.

    Unknown options are ignored; option names are expected lower-cased (the parser does
    that).  ``file_size`` answers ``tsize`` on reads.  Raises :class:`OptionError` for a
    known option whose value is invalid (the caller answers ERROR 8).
    """
    neg = Negotiated(timeout=default_timeout)
    for name, value in options.items():
        if name == "blksize":
            n = _int_option(name, value, MIN_BLKSIZE, MAX_BLKSIZE)
            neg.blksize = min(n, max_blksize)
            neg.oack["blksize"] = str(neg.blksize)
        elif name == "timeout":
            try:
                t = float(value.strip())
            except ValueError:
                raise OptionError("timeout: not a number") from None
            if not 1 <= t <= MAX_TIMEOUT:
                raise OptionError(f"timeout: {value} out of range 1..{MAX_TIMEOUT}")
            neg.timeout = t
            neg.oack["timeout"] = value.strip()
        elif name == "tsize":
            n = _int_option(name, value, 0, 2**63)
            if opcode == RRQ:
                if file_size is None:
                    continue  # size unknown: leave the option out
                neg.tsize = file_size
            else:
                if max_upload is not None and n > max_upload:
                    raise OptionError(f"tsize: {n} exceeds upload limit {max_upload}",
                                      ERR_DISK_FULL)
                neg.tsize = n
            neg.oack["tsize"] = str(neg.tsize)
        elif name == "windowsize":
            n = _int_option(name, value, 1, MAX_WINDOWSIZE)
            neg.windowsize = min(n, max_windowsize)
            neg.oack["windowsize"] = str(neg.windowsize)
        # anything else: ignored (RFC 2347)
    return neg


# --------------------------------------------------------------------------- transfers


class Source(Protocol):
    """What a read transfer sends: a size and random access to its bytes."""

    size: int

    def read(self, offset: int, n: int) -> bytes | memoryview: ...


class BytesSource:
    """In-memory content; reads are zero-copy memoryview slices."""

    __slots__ = ("_view", "size")

    def __init__(self, data: bytes | bytearray | memoryview):
        self._view = memoryview(data).cast("B")
        self.size = len(self._view)

    def read(self, offset: int, n: int) -> memoryview:
        return self._view[offset : offset + n]

    def native_source(self) -> tuple[memoryview, int]:
        """For a native data path: the bytes (no file descriptor)."""
        return self._view, -1


@dataclass(frozen=True, slots=True)
class Handover:
    """What a data path needs to continue a read transfer elsewhere (the native one
    takes these as keyword arguments); ``remaining`` is the time left to the deadline.
    ``oack`` is the OACK's bytes while it waits for ACK 0 (``sent`` 0), else None."""

    size: int
    blksize: int
    windowsize: int
    timeout: float
    retries: int
    acked: int
    sent: int
    attempt: int
    blocks_sent: int
    bytes_sent: int
    retransmissions: int
    remaining: float
    oack: bytes | None = None

    def as_kwargs(self) -> dict[str, int | float]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a read transfer continued elsewhere has got to, for :meth:`ReadTransfer.adopt`.

    ``end`` is None while it still runs (taken back before its end); ``finished`` is when
    it ended and ``deadline`` its next retransmission, both on the caller's clock."""

    acked: int
    sent: int
    attempt: int
    blocks_sent: int
    bytes_sent: int
    retransmissions: int
    end: End | None = None
    message: str | None = None
    peer_code: int | None = None
    finished: float | None = None
    deadline: float | None = None


class _Transfer:
    """What every transfer tracks: negotiated options, timer, outcome, counters."""

    __slots__ = (
        "attempt",
        "blksize",
        "deadline",
        "done",
        "end",
        "error",
        "finished",
        "max_retries",
        "oack",
        "ok",
        "peer_error",
        "retransmissions",
        "started",
        "timeout",
        "windowsize",
    )  # fmt: skip

    def __init__(self, blksize: int, windowsize: int, timeout: float, retries: int,
                 oack: dict[str, str] | None):
        self.blksize = blksize
        self.windowsize = windowsize
        self.timeout = timeout
        self.max_retries = retries
        self.oack = encode_oack(oack) if oack else None
        self.attempt = 0
        self.deadline: float | None = None
        self.done = False
        self.ok = False
        self.end: End | None = None
        self.error: str | None = None  # what went wrong, for people (None when ok)
        self.peer_error: int | None = None
        self.retransmissions = 0
        self.started = 0.0
        self.finished = 0.0

    def _interval(self) -> float:
        return self.timeout * (1 << min(self.attempt, MAX_BACKOFF_SHIFT))

    def _finish(self, now: float, end: End, error: str | None = None) -> tuple[list, None]:
        self.done = True
        self.end = end
        self.ok = end is End.COMPLETED
        self.error = error
        self.deadline = None
        self.finished = now
        return [], None

    def _fail(self, now: float, code: int, message: str, end: End) -> tuple[list, None]:
        """End with an ERROR to the peer."""
        self._finish(now, end, message)
        return [encode_error(code, message)], None

    def abandon(self, now: float, end: End, error: str) -> None:
        """End the transfer from outside (superseded, server stopping, a failure of the
        transport); nothing is sent.  No effect on a transfer that has ended."""
        if not self.done:
            self._finish(now, end, error)


class ReadTransfer(_Transfer):
    """Server side of a read request: send DATA, receive ACKs.

    Blocks are numbered absolutely from 1 internally; only the low 16 bits go on the
    wire, so transfers longer than 65,535 blocks roll over to 0 and keep going.
    A source that raises :class:`SourceChanged` ends the transfer with ERROR 0.
    """

    __slots__ = ("acked", "blocks_sent", "bytes_sent", "nblocks", "sent", "source")

    def __init__(
        self,
        source: Source,
        *,
        blksize: int = DEFAULT_BLKSIZE,
        windowsize: int = 1,
        timeout: float = 1.0,
        retries: int = 5,
        oack: dict[str, str] | None = None,
    ):
        super().__init__(blksize, windowsize, timeout, retries, oack)
        self.source = source
        self.nblocks = -1  # computed lazily: the size may come from a lazy source
        self.acked = 0  # highest block acknowledged (0 = OACK or nothing yet)
        self.sent = 0  # highest block sent
        self.blocks_sent = 0
        self.bytes_sent = 0

    # -- helpers

    def _window(self, first: int, out: list) -> None:
        """Append DATA packets first .. first+window-1 (bounded by the last block)."""
        nblocks = self.nblocks
        if nblocks < 0:
            nblocks = self.nblocks = self.source.size // self.blksize + 1
        last = min(first + self.windowsize - 1, nblocks)
        bs = self.blksize
        read = self.source.read
        headers = _DATA_HEADERS
        nbytes = 0
        for blk in range(first, last + 1):
            payload = read((blk - 1) * bs, bs)
            nbytes += len(payload)
            out.append(headers[blk & 0xFFFF] + payload)
        if first <= self.sent:
            self.retransmissions += min(last, self.sent) - first + 1
        self.blocks_sent += last - first + 1
        self.bytes_sent += nbytes
        self.sent = max(self.sent, last)

    def _send_window(self, first: int, now: float) -> tuple[list[bytes], float | None]:
        out: list[bytes] = []
        try:
            self._window(first, out)
        except SourceChanged:
            return self._fail(now, ERR_UNDEFINED, "file changed during transfer",
                              End.FILE_CHANGED)
        self.deadline = now + self._interval()
        return out, self.deadline

    # -- events
    def start(self, now: float) -> tuple[list[bytes], float | None]:
        self.started = now
        if self.oack is not None:
            self.deadline = now + self._interval()
            return [self.oack], self.deadline
        return self._send_window(1, now)

    def on_packet(self, data: bytes, now: float) -> tuple[list[bytes], float | None]:
        """A datagram from the transfer's peer (source TID already checked)."""
        if self.done:
            return [], None
        if len(data) >= 4 and data[0] == 0 and data[1] == ACK:
            wire = (data[2] << 8) | data[3]
            acked = self.acked
            blk = acked + ((wire - acked) & 0xFFFF)
            # Duplicate (or stale/future) ACK: ignore, never retransmit on it (Sorcerer's
            # Apprentice).  The exception is ACK 0 acknowledging our OACK.
            if (blk == acked or blk > self.sent) and not (
                self.sent == 0 and wire == 0 and self.oack is not None
            ):
                return [], self.deadline
            self.acked = blk
            if blk == self.nblocks:
                return self._finish(now, End.COMPLETED)
            self.attempt = 0
            return self._send_window(blk + 1, now)
        pkt = parse_packet(data)  # MalformedPacket propagates: the caller counts/drops
        if isinstance(pkt, Error):
            self.peer_error = pkt.code
            return self._finish(now, End.PEER_ERROR, f"peer error {pkt.code}: {pkt.message}")
        return self._fail(now, ERR_ILLEGAL_OP, f"unexpected opcode {type(pkt).__name__}",
                          End.UNEXPECTED)

    def on_timer(self, now: float) -> tuple[list[bytes], float | None]:
        if self.done:
            return [], None
        if self.deadline is not None and now < self.deadline:
            return [], self.deadline
        if self.attempt >= self.max_retries:
            return self._fail(now, ERR_UNDEFINED, "timeout", End.TIMEOUT)
        self.attempt += 1
        if self.sent == 0 and self.oack is not None:
            self.retransmissions += 1
            self.deadline = now + self._interval()
            return [self.oack], self.deadline
        return self._send_window(self.acked + 1, now)

    @property
    def oack_pending(self) -> bool:
        """OACK sent and not acknowledged yet."""
        return self.oack is not None and self.sent == 0 and not self.done

    # -- continuing elsewhere
    def handover(self, now: float) -> Handover:
        """The state a data path continues this transfer from: once its OACK is out (the
        data path then resends it until ACK 0) or its first window."""
        return Handover(
            self.source.size, self.blksize, self.windowsize, self.timeout, self.max_retries,
            self.acked, self.sent, self.attempt, self.blocks_sent, self.bytes_sent,
            self.retransmissions, max(0.0, (self.deadline or now) - now),
            self.oack if self.sent == 0 else None,
        )  # fmt: skip

    def adopt(self, progress: Progress) -> None:
        """Take over what a data path that continued this transfer did; ended, unless
        ``progress.end`` is None (taken back while it still ran)."""
        self.acked = progress.acked
        self.sent = progress.sent
        self.attempt = progress.attempt
        self.blocks_sent = progress.blocks_sent
        self.bytes_sent = progress.bytes_sent
        self.retransmissions = progress.retransmissions
        if progress.end is None:
            self.deadline = progress.deadline
            return
        if progress.end is End.PEER_ERROR:
            self.peer_error = progress.peer_code
        self._finish(progress.finished, progress.end, progress.message)


class WriteTransfer(_Transfer):
    """Server side of a write request: receive DATA, send ACKs.

    Delivered payloads accumulate in ``self.received`` (a bytearray) in order; the
    transport decides where they go once ``done and ok``.
    """

    __slots__ = ("_last_ack", "_since_ack", "blocks", "expected", "max_bytes", "received")

    def __init__(
        self,
        *,
        blksize: int = DEFAULT_BLKSIZE,
        windowsize: int = 1,
        timeout: float = 1.0,
        retries: int = 5,
        oack: dict[str, str] | None = None,
        max_bytes: int = 64 * 2**20,
    ):
        super().__init__(blksize, windowsize, timeout, retries, oack)
        self.max_bytes = max_bytes
        self.expected = 1  # next absolute block we want
        self.received = bytearray()
        self.blocks = 0
        self._since_ack = 0
        self._last_ack: bytes = b""

    @property
    def bytes_received(self) -> int:
        return len(self.received)

    def start(self, now: float) -> tuple[list[bytes], float | None]:
        self.started = now
        self._last_ack = self.oack if self.oack is not None else encode_ack(0)
        self.deadline = now + self._interval()
        return [self._last_ack], self.deadline

    def on_packet(self, data: bytes, now: float) -> tuple[list[bytes], float | None]:
        if self.done:
            return [], None
        pkt = parse_packet(data)
        if isinstance(pkt, Error):
            self.peer_error = pkt.code
            return self._finish(now, End.PEER_ERROR, f"peer error {pkt.code}: {pkt.message}")
        if not isinstance(pkt, Data):
            return self._fail(now, ERR_ILLEGAL_OP, f"unexpected opcode {type(pkt).__name__}",
                              End.UNEXPECTED)
        if len(pkt.payload) > self.blksize:
            return self._fail(now, ERR_ILLEGAL_OP, "DATA larger than negotiated blksize",
                              End.UNEXPECTED)
        expected = self.expected
        if pkt.block != expected & 0xFFFF:
            # Duplicate or gap: re-acknowledge the last in-order block (RFC 7440 sec. 4),
            # once per window so a gap does not trigger an ACK storm.
            if self.windowsize > 1 and self._since_ack < 0:
                return [], self.deadline
            self._since_ack = -1
            prev = expected - 1
            if prev > 0 or self.oack is None:
                self._last_ack = encode_ack(prev)
            return [self._last_ack], self.deadline
        if len(self.received) + len(pkt.payload) > self.max_bytes:
            return self._fail(now, ERR_DISK_FULL, "upload too large", End.UPLOAD_TOO_LARGE)
        self.received += pkt.payload
        self.blocks += 1
        self.expected = expected + 1
        self.attempt = 0
        self._since_ack = max(self._since_ack, 0) + 1
        last = len(pkt.payload) < self.blksize
        if last or self._since_ack >= self.windowsize:
            self._since_ack = 0
            self._last_ack = encode_ack(expected)
            if last:
                # Final ACK; we do not dally (a lost final ACK makes the client resend
                # its last block to a closed port, which it then treats as done).
                self._finish(now, End.COMPLETED)
                return [self._last_ack], None
            self.deadline = now + self._interval()
            return [self._last_ack], self.deadline
        self.deadline = now + self._interval()
        return [], self.deadline

    def on_timer(self, now: float) -> tuple[list[bytes], float | None]:
        if self.done:
            return [], None
        if self.deadline is not None and now < self.deadline:
            return [], self.deadline
        if self.attempt >= self.max_retries:
            return self._fail(now, ERR_UNDEFINED, "timeout", End.TIMEOUT)
        self.attempt += 1
        self.retransmissions += 1
        self._since_ack = 0
        self.deadline = now + self._interval()
        return [self._last_ack], self.deadline
