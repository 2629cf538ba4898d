"""bootinfo wire format (Emulab): 520-byte little-endian packets, sans-IO.

    offset  size  field
    0       2     version (short)
    2       2     opcode (short)
    4       4     status (int)
    8       512   data: boot_what, or a key for KEYED_REQUEST

boot_what inside data:
    0       2     flags (1 = cmdline present, 2 = secure)
    2       2     type
    4       260   what (union by type)
    264     224   cmdline, NUL-terminated (at most 223 bytes of text)
    488     24    unused, zero

Every decoding problem raises CodecError, and only CodecError.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from ..boottype import BootType

PACKET_SIZE = 520
DATA_SIZE = 512
HEADER = struct.Struct("<hhi")
WHAT_HEADER = struct.Struct("<hh")
WHAT_OFFSET = 4
WHAT_SIZE = 260
CMDLINE_OFFSET = 264
CMDLINE_SIZE = 224
NAME_SIZE = 256  # filename (MB) and mfs path

FLAG_CMDLINE = 1
FLAG_SECURE = 2

VERSION = 1
STATUS_OK = 0
STATUS_FAIL = 1


class Opcode(IntEnum):
    REQUEST = 1
    REPLY = 2
    ACK = 3
    ORDER = 4
    INFO = 5
    KEYED_REQUEST = 6


class CodecError(ValueError):
    """A packet or field that does not fit the bootinfo format."""


@dataclass(frozen=True, slots=True)
class BootWhat:
    type: BootType
    flags: int = 0            # FLAG_CMDLINE is set by encode when cmdline is non-empty
    partition: int = 0        # PART, DISKPART
    sysid: int = 0            # SYSID
    disk: int = 0             # DISKPART
    server: str = "0.0.0.0"   # MB: IPv4 of the TFTP server
    filename: str = ""        # MB
    mfs: str = ""             # MFS: "ip:/path"
    cmdline: str = ""


@dataclass(frozen=True, slots=True)
class Packet:
    opcode: int
    version: int = VERSION
    status: int = STATUS_OK
    data: bytes = b""  # up to 512 bytes; padded with zeros on encode

    def boot_what(self) -> BootWhat:
        return decode_boot_what(self.data)

    def key(self) -> str:
        """The key of a KEYED_REQUEST (NUL-terminated text in data)."""
        return _cstr(self.data, 0, DATA_SIZE, "key")


def _cstr(buf: bytes, off: int, size: int, what: str) -> str:
    raw = buf[off:off + size]
    end = raw.find(b"\0")
    if end < 0:
        raise CodecError(f"{what}: not NUL-terminated within {size} bytes")
    try:
        return raw[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"{what}: not valid UTF-8") from None


def _put_cstr(text: str, size: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if b"\0" in raw:
        raise CodecError(f"{what}: contains NUL")
    if len(raw) >= size:
        raise CodecError(f"{what}: {len(raw)} bytes, at most {size - 1} fit")
    return raw.ljust(size, b"\0")


def decode(buf: bytes) -> Packet:
    """Bytes -> Packet; anything but exactly 520 bytes is malformed."""
    if len(buf) != PACKET_SIZE:
        raise CodecError(f"packet is {len(buf)} bytes, expected {PACKET_SIZE}")
    version, opcode, status = HEADER.unpack_from(buf, 0)
    return Packet(opcode=opcode, version=version, status=status, data=bytes(buf[8:]))


def encode(packet: Packet) -> bytes:
    if len(packet.data) > DATA_SIZE:
        raise CodecError(f"data is {len(packet.data)} bytes, at most {DATA_SIZE}")
    try:
        head = HEADER.pack(packet.version, packet.opcode, packet.status)
    except struct.error as e:
        raise CodecError(f"header: {e}") from None
    return head + packet.data.ljust(DATA_SIZE, b"\0")


def decode_boot_what(data: bytes) -> BootWhat:
    if len(data) < DATA_SIZE:
        raise CodecError(f"boot_what: {len(data)} bytes, expected {DATA_SIZE}")
    flags, typ = WHAT_HEADER.unpack_from(data, 0)
    try:
        btype = BootType(typ)
    except ValueError:
        raise CodecError(f"boot_what: unknown type {typ}") from None
    cmdline = _cstr(data, CMDLINE_OFFSET, CMDLINE_SIZE, "cmdline") \
        if flags & FLAG_CMDLINE else ""
    w = WHAT_OFFSET
    kw: dict = {}
    if btype is BootType.PART:
        (kw["partition"],) = struct.unpack_from("<i", data, w)
    elif btype is BootType.SYSID:
        (kw["sysid"],) = struct.unpack_from("<i", data, w)
    elif btype is BootType.DISKPART:
        kw["disk"], kw["partition"] = struct.unpack_from("<ii", data, w)
    elif btype is BootType.MB:
        kw["server"] = str(ipaddress.IPv4Address(data[w:w + 4]))
        kw["filename"] = _cstr(data, w + 4, NAME_SIZE, "filename")
    elif btype is BootType.MFS:
        kw["mfs"] = _cstr(data, w, NAME_SIZE, "mfs")
    return BootWhat(type=btype, flags=flags, cmdline=cmdline, **kw)


def encode_boot_what(bw: BootWhat) -> bytes:
    flags = bw.flags & ~FLAG_CMDLINE
    cmd = b""
    if bw.cmdline:
        flags |= FLAG_CMDLINE
        cmd = _put_cstr(bw.cmdline, CMDLINE_SIZE, "cmdline")
    t = BootType(bw.type)
    try:
        if t is BootType.PART:
            what = struct.pack("<i", bw.partition)
        elif t is BootType.SYSID:
            what = struct.pack("<i", bw.sysid)
        elif t is BootType.DISKPART:
            what = struct.pack("<ii", bw.disk, bw.partition)
        elif t is BootType.MB:
            try:
                ip = ipaddress.IPv4Address(bw.server).packed
            except ValueError:
                raise CodecError(f"server: not an IPv4 address: {bw.server!r}") from None
            what = ip + _put_cstr(bw.filename, NAME_SIZE, "filename")
        elif t is BootType.MFS:
            what = _put_cstr(bw.mfs, NAME_SIZE, "mfs")
        else:
            what = b""
        head = WHAT_HEADER.pack(flags, int(t))
    except struct.error as e:
        raise CodecError(f"boot_what: {e}") from None
    out = head + what.ljust(WHAT_SIZE, b"\0")
    return (out + cmd).ljust(DATA_SIZE, b"\0")


def reply(bw: BootWhat, opcode: Opcode = Opcode.REPLY, version: int = VERSION) -> bytes:
    """A complete REPLY (or ORDER) packet carrying `bw`."""
    return encode(Packet(opcode=int(opcode), version=version, status=STATUS_OK,
                         data=encode_boot_what(bw)))


def request(version: int = VERSION) -> bytes:
    """A loader's REQUEST, as the client side (tests, storm simulator) sends it."""
    return encode(Packet(opcode=int(Opcode.REQUEST), version=version))


def keyed_request(key: str, version: int = VERSION) -> bytes:
    return encode(Packet(opcode=int(Opcode.KEYED_REQUEST), version=version,
                         data=_put_cstr(key, DATA_SIZE, "key")))
