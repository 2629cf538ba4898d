"""The imaging protocol's datagrams: one codec for server, receivers and the C client.

Every datagram starts with ``"BH"``, the version (1) and a type byte; integers are big
endian.  Control messages travel unicast between a receiver and the server's control
port; DATA goes to the session's multicast group and port.  docs/imaging.md lists every
field.  ``decode`` raises :class:`Malformed` for anything that is not a well-formed
message, and nothing else.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

MAGIC = b"BH"
VERSION = 1
JOIN, JOINED, REFUSED, REQUEST, DATA, LEAVE = 1, 2, 3, 4, 5, 6

MAX_DATAGRAM = 1472  # what fits a 1500-byte MTU under IPv4 + UDP
DATA_HEADER = 20
REPAIR_FLAG = 0x8000  # symbol field: repair symbols set it, with stripe << 6 | index
MAX_RANGES = 64
MAX_NEEDS = 160

# REFUSED codes
UNKNOWN_IMAGE, BUSY, UNKNOWN_SESSION, BAD_IMAGE = 1, 2, 3, 4
# Not a refusal: the session is gathering the receivers of a reload; join again.
HOLD = 5
# LEAVE status
LEFT_DONE, LEFT_FALLBACK, LEFT_FAILED = 0, 1, 2

_HEAD = struct.Struct("!2sBB")
_JOIN = struct.Struct("!IIB")
_JOINED = struct.Struct("!II4sHHIIHHQI32s32sB")
_REFUSED = struct.Struct("!IBB")
_REQUEST = struct.Struct("!IIIIBH")  # session, receiver, done, seen, ranges, needs
_RANGE = struct.Struct("!II")
_NEED = struct.Struct("!IHB")
_FEEDBACK = struct.Struct("!IIB")  # received, lost, backlog
_DATA = struct.Struct("!2sBBIIIH2x")  # session, chunk, seq, symbol
_LEAVE = struct.Struct("!IIBI")


class Malformed(ValueError):
    """Not a well-formed imaging datagram."""


@dataclass(frozen=True, slots=True)
class Join:
    nonce: int
    receiver: int
    image: str


@dataclass(frozen=True, slots=True)
class Joined:
    nonce: int
    session: int
    group: str
    port: int
    http_port: int
    chunk_size: int
    chunk_count: int
    block: int
    flags: int
    disk_size: int
    header_len: int
    meta_sha256: bytes
    image_sha256: bytes
    image: str


@dataclass(frozen=True, slots=True)
class Refused:
    nonce: int  # the JOIN's nonce, or the session for REQUEST/LEAVE
    code: int
    message: str


@dataclass(frozen=True, slots=True)
class Feedback:
    """How a receiver keeps up, for the server's rate (an optional REQUEST trailer)."""

    received: int  # DATA datagrams of the session received so far
    lost: int  # datagrams it lost to strain so far: dropped at its full socket buffer (the
    # kernel's count) or lost in runs (a full NIC ring or queue); not isolated losses
    backlog: int  # percent of its socket's receive buffer in use, at most, since last asked


@dataclass(frozen=True, slots=True)
class Request:
    session: int
    receiver: int
    done: int  # chunks complete at the receiver (progress)
    seen: int  # the highest DATA sequence number it has received
    ranges: tuple[tuple[int, int], ...]  # (first chunk, count): chunks wanted whole
    needs: tuple[tuple[int, int, int], ...]  # (chunk, stripe, symbols still needed)
    feedback: Feedback | None = None


@dataclass(frozen=True, slots=True)
class Data:
    session: int
    chunk: int
    seq: int  # per session, +1 per datagram queued: requests say what they had seen
    symbol: int  # source block number, or REPAIR_FLAG | stripe << 6 | repair index
    payload: bytes | memoryview

    @property
    def repair(self) -> bool:
        return bool(self.symbol & REPAIR_FLAG)


@dataclass(frozen=True, slots=True)
class Leave:
    session: int
    receiver: int
    status: int
    done: int


Message = Join | Joined | Refused | Request | Data | Leave


def _name(b: bytes) -> str:
    try:
        return b.decode("ascii")
    except UnicodeDecodeError:
        raise Malformed("name is not ASCII") from None


def decode(data: bytes | bytearray | memoryview) -> Message:
    data = bytes(data)
    if len(data) < 4:
        raise Malformed("short datagram")
    magic, version, kind = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise Malformed("bad magic")
    if version != VERSION:
        raise Malformed(f"version {version}")
    try:
        if kind == DATA:
            if len(data) <= DATA_HEADER:
                raise Malformed("DATA without payload")
            _, _, _, session, chunk, seq, symbol = _DATA.unpack_from(data)
            return Data(session, chunk, seq, symbol, memoryview(data)[DATA_HEADER:])
        if kind == JOIN:
            nonce, receiver, n = _JOIN.unpack_from(data, 4)
            name = data[4 + _JOIN.size:]
            if len(name) != n or not n:
                raise Malformed("JOIN name length")
            return Join(nonce, receiver, _name(name))
        if kind == JOINED:
            f = _JOINED.unpack_from(data, 4)
            name = data[4 + _JOINED.size:]
            if len(name) != f[-1]:
                raise Malformed("JOINED name length")
            group = str(ipaddress.IPv4Address(f[2]))
            return Joined(f[0], f[1], group, *f[3:13], _name(name))
        if kind == REFUSED:
            nonce, code, n = _REFUSED.unpack_from(data, 4)
            msg = data[4 + _REFUSED.size:]
            if len(msg) != n:
                raise Malformed("REFUSED message length")
            return Refused(nonce, code, msg.decode("utf-8", "replace"))
        if kind == REQUEST:
            session, receiver, done, seen, nranges, nneeds = _REQUEST.unpack_from(data, 4)
            off = 4 + _REQUEST.size
            body = off + nranges * _RANGE.size + nneeds * _NEED.size
            if len(data) not in (body, body + _FEEDBACK.size):
                raise Malformed("REQUEST length")
            if nranges > MAX_RANGES or nneeds > MAX_NEEDS:
                raise Malformed("REQUEST too long")
            ranges = tuple(_RANGE.unpack_from(data, off + i * _RANGE.size) for i in range(nranges))
            off += nranges * _RANGE.size
            needs = tuple(_NEED.unpack_from(data, off + i * _NEED.size) for i in range(nneeds))
            fb = None
            if len(data) > body:
                fb = Feedback(*_FEEDBACK.unpack_from(data, body))
                if fb.backlog > 100:
                    raise Malformed("REQUEST backlog above 100 %")
            return Request(session, receiver, done, seen, ranges, needs, fb)
        if kind == LEAVE:
            if len(data) != 4 + _LEAVE.size:
                raise Malformed("LEAVE length")
            return Leave(*_LEAVE.unpack_from(data, 4))
    except struct.error:
        raise Malformed("truncated") from None
    raise Malformed(f"unknown type {kind}")


def _head(kind: int) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, kind)


def encode(m: Message) -> bytes:
    if isinstance(m, Data):
        return data_header(m.session, m.chunk, m.seq, m.symbol) + bytes(m.payload)
    if isinstance(m, Join):
        name = m.image.encode("ascii")
        return _head(JOIN) + _JOIN.pack(m.nonce, m.receiver, len(name)) + name
    if isinstance(m, Joined):
        name = m.image.encode("ascii")
        return _head(JOINED) + _JOINED.pack(
            m.nonce, m.session, ipaddress.IPv4Address(m.group).packed, m.port, m.http_port,
            m.chunk_size, m.chunk_count, m.block, m.flags, m.disk_size, m.header_len,
            m.meta_sha256, m.image_sha256, len(name)) + name
    if isinstance(m, Refused):
        msg = m.message.encode("utf-8")[:255]
        return _head(REFUSED) + _REFUSED.pack(m.nonce, m.code, len(msg)) + msg
    if isinstance(m, Request):
        return (_head(REQUEST) + _REQUEST.pack(m.session, m.receiver, m.done, m.seen,
                                               len(m.ranges), len(m.needs))
                + b"".join(_RANGE.pack(*r) for r in m.ranges)
                + b"".join(_NEED.pack(*n) for n in m.needs)
                + (_FEEDBACK.pack(m.feedback.received, m.feedback.lost, m.feedback.backlog)
                   if m.feedback else b""))
    return _head(LEAVE) + _LEAVE.pack(m.session, m.receiver, m.status, m.done)


def data_header(session: int, chunk: int, seq: int, symbol: int) -> bytes:
    return _DATA.pack(MAGIC, VERSION, DATA, session, chunk, seq & 0xFFFFFFFF, symbol)


def repair_symbol(stripe: int, index: int) -> int:
    return REPAIR_FLAG | stripe << 6 | index


def split_symbol(symbol: int) -> tuple[int, int]:
    """(stripe, repair index) of a repair symbol."""
    return (symbol & 0x7FFF) >> 6, symbol & 0x3F
