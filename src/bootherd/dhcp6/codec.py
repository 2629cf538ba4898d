"""Sans-IO DHCPv6 codec (RFC 8415; boot options of RFC 5970; RFC 6939 client link-layer).

No sockets, no clock.  A message is its type, its transaction id (client/server
messages) or hop count and two addresses (relay messages), and its options in wire
order as ``(code, raw value)`` pairs.  Options carrying options (IA_NA, IAADDR, relay
message) are decoded on demand by the helpers below.

:func:`decode` raises nothing but :class:`MalformedPacket`, for any byte string;
:func:`encode` raises nothing but :class:`EncodeError`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from ..dhcp.options import EncodeError, MalformedPacket
from ..firmware import Firmware, pxe_firmware

__all__ = ["EncodeError", "MalformedPacket", "Message", "Opt", "MsgType", "decode", "encode"]

SERVER_PORT, CLIENT_PORT = 547, 546
ALL_SERVERS = "ff02::1:2"  # All_DHCP_Relay_Agents_and_Servers


class MsgType:
    SOLICIT, ADVERTISE, REQUEST, CONFIRM, RENEW, REBIND, REPLY = 1, 2, 3, 4, 5, 6, 7
    RELEASE, DECLINE, RECONFIGURE, INFORMATION_REQUEST = 8, 9, 10, 11
    RELAY_FORW, RELAY_REPL = 12, 13


RELAYED = (MsgType.RELAY_FORW, MsgType.RELAY_REPL)


class Opt:
    CLIENTID, SERVERID, IA_NA, IA_TA, IAADDR, ORO, PREFERENCE, ELAPSED_TIME = 1, 2, 3, 4, 5, 6, 7, 8
    RELAY_MSG, STATUS_CODE, RAPID_COMMIT, USER_CLASS, VENDOR_CLASS = 9, 13, 14, 15, 16
    INTERFACE_ID, DNS_SERVERS, DOMAIN_LIST = 18, 23, 24
    BOOTFILE_URL, BOOTFILE_PARAM, CLIENT_ARCH, CLIENT_NII = 59, 60, 61, 62
    CLIENT_LINKLAYER_ADDR = 79


class Status:
    SUCCESS, UNSPEC_FAIL, NO_ADDRS_AVAIL, NO_BINDING, NOT_ON_LINK, USE_MULTICAST = 0, 1, 2, 3, 4, 5


Options = list[tuple[int, bytes]]


@dataclass(slots=True)
class Message:
    """A DHCPv6 message: client/server (xid) or relay (hop_count, link, peer)."""

    msg_type: int
    xid: int = 0  # 24 bits; client/server messages only
    options: Options = field(default_factory=list)
    hop_count: int = 0  # relay messages only
    link_address: bytes = bytes(16)
    peer_address: bytes = bytes(16)

    def get(self, code: int) -> bytes | None:
        """The first option `code`, or None."""
        for c, v in self.options:
            if c == code:
                return v
        return None

    def all(self, code: int) -> list[bytes]:
        return [v for c, v in self.options if c == code]

    @property
    def relayed(self) -> bool:
        return self.msg_type in RELAYED


_HDR = struct.Struct("!I")  # type (8) + transaction id (24)
_RELAY = struct.Struct("!BB16s16s")
_OPT = struct.Struct("!HH")


def decode_options(data: bytes, where: str = "message") -> Options:
    out: Options = []
    i, n = 0, len(data)
    while i < n:
        if n - i < 4:
            raise MalformedPacket(f"{where}: truncated option header")
        code, length = _OPT.unpack_from(data, i)
        i += 4
        if i + length > n:
            raise MalformedPacket(f"{where}: option {code} overruns the message")
        out.append((code, data[i:i + length]))
        i += length
    return out


def encode_options(options: Iterable[tuple[int, bytes]]) -> bytes:
    parts = []
    for code, value in options:
        if not 0 <= code <= 0xFFFF or len(value) > 0xFFFF:
            raise EncodeError(f"option {code}: code or length out of range")
        parts.append(_OPT.pack(code, len(value)) + value)
    return b"".join(parts)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode a DHCPv6 UDP payload.  Raises only :class:`MalformedPacket`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedPacket("not a byte string")
    data = bytes(data)
    if len(data) < 4:
        raise MalformedPacket("shorter than the DHCPv6 header")
    mt = data[0]
    if mt == 0:
        raise MalformedPacket("message type 0")
    if mt in RELAYED:
        if len(data) < _RELAY.size:
            raise MalformedPacket("shorter than the relay header")
        _, hops, link, peer = _RELAY.unpack_from(data)
        return Message(mt, 0, decode_options(data[_RELAY.size:]), hops, link, peer)
    xid = _HDR.unpack_from(data)[0] & 0xFFFFFF
    return Message(mt, xid, decode_options(data[4:]))


def encode(msg: Message) -> bytes:
    try:
        if msg.msg_type in RELAYED:
            head = _RELAY.pack(msg.msg_type, msg.hop_count, msg.link_address, msg.peer_address)
        else:
            if not 0 < msg.msg_type < 256 or not 0 <= msg.xid < 1 << 24:
                raise EncodeError("message type or transaction id out of range")
            head = _HDR.pack(msg.msg_type << 24 | msg.xid)
    except struct.error as exc:
        raise EncodeError(f"bad header: {exc}") from exc
    return head + encode_options(msg.options)


# ------------------------------------------------------------------------ option values


@dataclass(slots=True)
class IaAddr:
    address: bytes  # 16 bytes
    preferred: int
    valid: int
    options: Options = field(default_factory=list)


@dataclass(slots=True)
class IaNa:
    iaid: int
    t1: int
    t2: int
    options: Options = field(default_factory=list)

    def addresses(self) -> list[IaAddr]:
        return [decode_iaaddr(v) for c, v in self.options if c == Opt.IAADDR]


def decode_ia_na(raw: bytes) -> IaNa:
    if len(raw) < 12:
        raise MalformedPacket("IA_NA shorter than 12 bytes")
    iaid, t1, t2 = struct.unpack_from("!III", raw)
    return IaNa(iaid, t1, t2, decode_options(raw[12:], "IA_NA"))


def encode_ia_na(ia: IaNa) -> bytes:
    return struct.pack("!III", ia.iaid, ia.t1, ia.t2) + encode_options(ia.options)


def decode_iaaddr(raw: bytes) -> IaAddr:
    if len(raw) < 24:
        raise MalformedPacket("IAADDR shorter than 24 bytes")
    addr = raw[:16]
    preferred, valid = struct.unpack_from("!II", raw, 16)
    return IaAddr(addr, preferred, valid, decode_options(raw[24:], "IAADDR"))


def encode_iaaddr(a: IaAddr) -> bytes:
    if len(a.address) != 16:
        raise EncodeError("IAADDR address must be 16 bytes")
    return a.address + struct.pack("!II", a.preferred, a.valid) + encode_options(a.options)


def status(code: int, message: str = "") -> bytes:
    return struct.pack("!H", code) + message.encode()


def decode_status(raw: bytes) -> tuple[int, str]:
    if len(raw) < 2:
        raise MalformedPacket("status code shorter than 2 bytes")
    return struct.unpack_from("!H", raw)[0], raw[2:].decode("utf-8", "replace")


def decode_u16_list(raw: bytes, what: str) -> list[int]:
    if len(raw) % 2:
        raise MalformedPacket(f"{what}: odd length")
    return [raw[i] << 8 | raw[i + 1] for i in range(0, len(raw), 2)]


def decode_opaque_list(raw: bytes, what: str) -> list[bytes]:
    """User class data / vendor class data: 16-bit length-prefixed items."""
    out, i = [], 0
    while i < len(raw):
        if len(raw) - i < 2:
            raise MalformedPacket(f"{what}: truncated item length")
        n = raw[i] << 8 | raw[i + 1]
        i += 2
        if i + n > len(raw):
            raise MalformedPacket(f"{what}: item overruns")
        out.append(raw[i:i + n])
        i += n
    return out


def opaque_list(items: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("!H", len(x)) + x for x in items)


def vendor_class(raw: bytes) -> tuple[int, list[bytes]]:
    """(enterprise number, class data items) of option 16."""
    if len(raw) < 4:
        raise MalformedPacket("vendor class shorter than 4 bytes")
    return struct.unpack_from("!I", raw)[0], decode_opaque_list(raw[4:], "vendor class")


def encode_vendor_class(enterprise: int, items: Iterable[bytes]) -> bytes:
    return struct.pack("!I", enterprise) + opaque_list(items)


# ---------------------------------------------------------------------- client identity


def duid_mac(duid: bytes) -> bytes | None:
    """The Ethernet MAC inside a DUID-LLT (type 1) or DUID-LL (type 3), else None."""
    if len(duid) >= 4 and duid[:2] == b"\x00\x01" and duid[2:4] == b"\x00\x01" \
            and len(duid) == 14:
        return duid[8:14]
    if len(duid) >= 4 and duid[:2] == b"\x00\x03" and duid[2:4] == b"\x00\x01" \
            and len(duid) == 10:
        return duid[4:10]
    return None


def eui64_mac(address: str) -> bytes | None:
    """The MAC a modified-EUI-64 link-local address was formed from (fe80::xxff:fexx:...)."""
    try:
        a = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return None
    b = a.packed
    if not a.is_link_local or b[11] != 0xFF or b[12] != 0xFE:
        return None
    return bytes([b[8] ^ 0x02]) + b[9:11] + b[13:16]


def client_mac(msg: Message, src: str, relay_opts: Options | None = None) -> bytes | None:
    """The client's MAC: RFC 6939's option 79 from a relay, its DUID, or the EUI-64
    link-local address it spoke from (firmware with a DUID-UUID: OVMF, iPXE)."""
    for code, value in relay_opts or ():
        if code == Opt.CLIENT_LINKLAYER_ADDR and len(value) == 8 and value[:2] == b"\x00\x01":
            return value[2:]
    duid = msg.get(Opt.CLIENTID)
    mac = duid_mac(duid) if duid else None
    return mac or eui64_mac(src)


def iter_user_class(msg: Message) -> Iterator[bytes]:
    for raw in msg.all(Opt.USER_CLASS):
        try:
            yield from decode_opaque_list(raw, "user class")
        except MalformedPacket:
            continue


def classify_client(msg: Message) -> Firmware:
    """Firmware from options 15 (iPXE), 16 (PXEClient / HTTPClient) and 61.  Never raises."""
    if any(uc == b"iPXE" for uc in iter_user_class(msg)):
        return Firmware.IPXE
    vc_raw = msg.get(Opt.VENDOR_CLASS)
    try:
        items = vendor_class(vc_raw)[1] if vc_raw is not None else []
    except MalformedPacket:
        items = []
    kind = next((x for x in items if x.startswith((b"PXEClient", b"HTTPClient"))), None)
    if kind is None:
        return Firmware.OTHER
    arch_raw = msg.get(Opt.CLIENT_ARCH)
    arch = None
    if arch_raw is not None and len(arch_raw) >= 2:
        arch = arch_raw[0] << 8 | arch_raw[1]
    else:
        fields = kind.split(b":")
        if len(fields) >= 3 and fields[1] == b"Arch" and fields[2].isdigit():
            arch = int(fields[2])
    return pxe_firmware(arch, http=kind.startswith(b"HTTPClient"))
