"""Sans-IO DHCPv4/BOOTP codec (RFC 951, 1542, 2131, 2132, 3004, 3046, 3396, 4578; PXE 2.1).

No sockets, no clock. Designed for speed:

* :func:`decode` unpacks the fixed header with one precompiled ``struct`` call and walks the
  options once into ``DhcpMessage.options`` -- a ``dict[int, bytes]`` of raw values keyed by
  option code (repeated options concatenated per RFC 3396, option-overload areas merged).
  Values are only interpreted by the typed accessors, on demand.
* :func:`encode` packs the header with one precompiled ``struct`` call and joins the option
  TLVs; the slow path (overload into ``file``/``sname``, dropping options) only runs when the
  reply would exceed the client's maximum message size.

Decoding never raises anything but :class:`MalformedPacket`, for any byte string.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable, Mapping
from ipaddress import IPv4Address
from typing import Any

from bootherd.dhcp.options import (
    AddressLike,
    ClientArch,
    EncodeError,
    IpxeOpt,
    MalformedPacket,
    MessageType,
    Opt,
    PxeVendorOptions,
    decode_client_arch,
    decode_ip,
    decode_ip_list,
    decode_pxe_vendor,
    decode_suboptions,
    decode_u16,
    decode_u32,
    decode_user_class,
    encode_client_arch,
    encode_ip_list,
    encode_pxe_vendor,
    encode_suboptions,
    encode_u16,
    encode_u32,
    encode_user_class,
    ip_bytes,
)
from bootherd.firmware import Firmware, pxe_firmware

__all__ = [
    "BOOTREPLY",
    "BOOTREQUEST",
    "BROADCAST_FLAG",
    "DEFAULT_MANDATORY",
    "MAGIC_COOKIE",
    "ClientArch",
    "DhcpMessage",
    "EncodeError",
    "Firmware",
    "MalformedPacket",
    "MessageType",
    "Opt",
    "PxeVendorOptions",
    "classify_client",
    "decode",
    "encode",
    "encode_ipxe_encap",
    "encode_pxe_vendor",
    "encode_reply",
    "make_reply",
]

BOOTREQUEST = 1
BOOTREPLY = 2
BROADCAST_FLAG = 0x8000
MAGIC_COOKIE = b"\x63\x82\x53\x63"
ZERO_IP = b"\x00\x00\x00\x00"

#: Options never dropped by :func:`encode` to fit the size limit (RFC 2131 table 3 plus
#: PXE/iPXE essentials and relay agent information, which must be echoed).
DEFAULT_MANDATORY: frozenset[int] = frozenset(
    {1, 3, 43, 51, 53, 54, 56, 58, 59, 60, 66, 67, 82, 175}
)

_HDR = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # 236 bytes
_HDR_LEN = 236
_OPTS_START = 240
_MIN_IP_DATAGRAM = 576  # RFC 2131/2132 minimum maximum-message-size
_IP_UDP_OVERHEAD = 28  # option 57 counts the IP datagram; we size the UDP payload
_BOOTP_MIN_LEN = 300  # RFC 1542: pad replies to the BOOTP minimum
_PAD300 = bytes(_BOOTP_MIN_LEN)


# --------------------------------------------------------------------------- decoding


def _parse_options(buf: bytes, i: int, opts: dict[int, bytes]) -> None:
    """Walk code/len/value TLVs in buf[i:] into opts (pad skipped, stops at END or buf end)."""
    end = len(buf)
    try:
        while True:
            code = buf[i]
            if 0 < code < 255:
                k = i + 2
                i = k + buf[i + 1]
                if i > end:
                    raise MalformedPacket(f"option {code} overruns its field")
                if code in opts:
                    opts[code] += buf[k:i]
                else:
                    opts[code] = buf[k:i]
            elif code:
                return  # END
            else:
                i += 1  # PAD
    except IndexError:
        if i != end:
            raise MalformedPacket("truncated option header") from None


def decode(data: bytes | bytearray | memoryview) -> DhcpMessage:
    """Decode a BOOTP/DHCPv4 packet (the UDP payload). Raises only :class:`MalformedPacket`."""
    if type(data) is not bytes:
        if not isinstance(data, bytearray | memoryview):
            raise MalformedPacket("not a byte string")
        data = bytes(data)
    n = len(data)
    if n < _HDR_LEN:
        raise MalformedPacket("shorter than the BOOTP header")
    (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, ch, sname, file) = _HDR.unpack_from(
        data
    )
    if op != 1 and op != 2:
        raise MalformedPacket("bad op")
    if hlen > 16:
        raise MalformedPacket("hlen > 16")
    opts: dict[int, bytes] = {}
    overload = 0
    if n > _HDR_LEN:
        cookie = data[236:240]
        if cookie == MAGIC_COOKIE:
            _parse_options(data, _OPTS_START, opts)
            ov = opts.pop(52, None)
            if ov is not None:
                if len(ov) != 1 or not 1 <= ov[0] <= 3:
                    raise MalformedPacket("bad option overload value")
                overload = ov[0]
                # RFC 2131 4.1 / RFC 3396: options field, then file, then sname.
                if overload & 1:
                    _parse_options(file, 0, opts)
                if overload & 2:
                    _parse_options(sname, 0, opts)
                opts.pop(52, None)
        elif cookie.strip(b"\x00") or n < _OPTS_START:
            raise MalformedPacket("bad magic cookie")
        # else: plain BOOTP with an empty (all-zero) vendor area.
    msg = _new_message(DhcpMessage)
    msg.op = op
    msg.htype = htype
    msg.hlen = hlen
    msg.hops = hops
    msg.xid = xid
    msg.secs = secs
    msg.flags = flags
    msg.ciaddr = ci
    msg.yiaddr = yi
    msg.siaddr = si
    msg.giaddr = gi
    msg.chaddr = ch
    # Fields that carried overloaded options hold no name: expose them as empty.
    msg.sname = b"" if overload & 2 else sname.rstrip(b"\x00")
    msg.file = b"" if overload & 1 else file.rstrip(b"\x00")
    msg.options = opts
    msg.overload = overload
    return msg


_new_message = object.__new__


# --------------------------------------------------------------------------- encoding


def _tlvs(code: int, val: bytes) -> bytes:
    n = len(val)
    if n <= 255:
        return bytes((code, n)) + val
    # RFC 3396: split into several consecutive instances.
    return b"".join(
        bytes((code, len(val[k : k + 255]))) + val[k : k + 255] for k in range(0, n, 255)
    )


def _order(opts: Mapping[int, bytes], prl: bytes) -> tuple[int, ...]:
    """Option codes in wire order: 53, 54, then PRL order, then the rest as inserted, 82 last.

    Memoised on (prl, codes present): a server sends the same option set to the same kind of
    firmware over and over, so this is a dict hit in the steady state.
    """
    key = (prl, tuple(opts))
    order = _ORDER_CACHE.get(key)
    if order is not None:
        return order
    for c in opts:
        if not isinstance(c, int) or not 0 < c < 255 or c == 52:
            raise EncodeError(f"option code {c!r} cannot be set directly")
    seen: dict[int, None] = {}
    if 53 in opts:
        seen[53] = None
    if 54 in opts:
        seen[54] = None
    for c in prl:
        if c in opts:
            seen[c] = None
    for c in opts:
        seen[c] = None
    if 82 in seen:
        del seen[82]
        seen[82] = None
    order = tuple(seen)
    if len(_ORDER_CACHE) >= 4096:
        _ORDER_CACHE.clear()
    _ORDER_CACHE[key] = order
    return order


_ORDER_CACHE: dict[tuple[bytes, tuple[int, ...]], tuple[int, ...]] = {}
_TL: dict[int, bytes] = {}  # TLV heads by code << 8 | len, filled on first use


def _pack_areas(items: list[tuple[int, bytes]], caps: list[int]) -> list[list[bytes]] | None:
    """Place options into areas of the given capacities (END excluded), first fit.

    Options of <= 255 bytes are never split (many PXE ROMs do not implement RFC 3396) and go
    to the first area with room; longer ones are split into consecutive instances filling the
    areas forward (options, file, sname: the RFC 3396 concatenation order).
    Returns None if they do not fit.
    """
    out: list[list[bytes]] = [[] for _ in caps]
    rem = list(caps)
    last = len(caps) - 1
    for code, val in items:
        n = len(val)
        if n <= 255:
            need = n + 2
            for ai in range(last + 1):
                if need <= rem[ai]:
                    out[ai].append(bytes((code, n)) + val)
                    rem[ai] -= need
                    break
            else:
                return None
            continue
        ai = 0
        k = 0
        while k < n:
            while rem[ai] < 3:
                if ai == last:
                    return None
                ai += 1
            take = min(255, rem[ai] - 2, n - k)
            out[ai].append(bytes((code, take)) + val[k : k + take])
            rem[ai] -= take + 2
            k += take
    return out


def encode(
    msg: DhcpMessage,
    *,
    prl: bytes | Iterable[int] | None = None,
    max_message_size: int | None = None,
    mandatory: Collection[int] = DEFAULT_MANDATORY,
) -> bytes:
    """Encode ``msg`` to a UDP payload.

    Options are ordered 53, 54, then the client's parameter request list ``prl`` (option-55
    value), then the remaining options in insertion order, 82 last. ``max_message_size`` is the
    client's option 57 (IP datagram size, values below 576 and None mean 576); the payload is
    kept within it minus 28 bytes of IP/UDP headers. If the options do not fit, the empty
    ``file`` then ``sname`` fields are used for overflow (option 52); if that is not enough,
    options outside ``mandatory`` are dropped from the end (unrequested first, then the least
    preferred requested ones). Raises :class:`EncodeError` if mandatory options cannot fit.
    """
    sname = msg.sname
    file = msg.file
    if len(sname) > 64 or len(file) > 128 or len(msg.chaddr) > 16:
        raise EncodeError("sname, file or chaddr too long")
    opts = msg.options
    if type(prl) is not bytes:
        try:
            prl = bytes(prl) if prl else b""
        except (TypeError, ValueError) as exc:
            raise EncodeError("bad parameter request list") from exc
    order = _order(opts, prl)
    parts: list[bytes] = [b"", MAGIC_COOKIE]
    append = parts.append
    total = 0
    tl = _TL
    mms = max_message_size if max_message_size and max_message_size > 576 else 576
    limit = mms - _IP_UDP_OVERHEAD
    try:
        for code in order:
            val = opts[code]
            n = len(val)
            if n < 256:
                head = tl.get(code << 8 | n)
                if head is None:
                    head = tl[code << 8 | n] = bytes((code, n))
                append(head)
                append(val)
                total += n + 2
            else:
                val = _tlvs(code, val)
                append(val)
                total += len(val)
        if _OPTS_START + total + 1 <= limit:
            parts[0] = _HDR.pack(
                msg.op, msg.htype, msg.hlen, msg.hops, msg.xid, msg.secs, msg.flags,
                msg.ciaddr, msg.yiaddr, msg.siaddr, msg.giaddr, msg.chaddr, sname, file,
            )  # fmt: skip
            append(b"\xff")
            if total < 59:  # pad to the 300-byte BOOTP minimum
                append(_PAD300[: 59 - total])
            return b"".join(parts)
        return _encode_overflow(msg, [(c, opts[c]) for c in order], limit, mandatory)
    except (struct.error, TypeError) as exc:
        raise EncodeError(f"bad field or option value: {exc}") from exc


def _encode_overflow(
    msg: DhcpMessage, items: list[tuple[int, bytes]], limit: int, mandatory: Collection[int]
) -> bytes:
    main_cap = limit - _OPTS_START - 1 - 3  # END, option 52
    caps = [main_cap]
    use_file = not msg.file
    use_sname = not msg.sname
    if use_file:
        caps.append(127)
    if use_sname:
        caps.append(63)
    if len(caps) == 1:
        caps[0] += 3  # no overload possible, no option 52 needed
    keep = set(mandatory) | {53, 54, 82}
    while True:
        packed = _pack_areas(items, caps)
        if packed is not None:
            break
        for idx in range(len(items) - 1, -1, -1):
            if items[idx][0] not in keep:
                del items[idx]
                break
        else:
            raise EncodeError("mandatory options exceed the maximum message size")
    main = packed[0]
    file = msg.file
    sname = msg.sname
    overload = 0
    k = 1
    if use_file:
        if packed[k]:
            file = b"".join(packed[k]) + b"\xff"
            overload |= 1
        k += 1
    if use_sname and packed[k]:
        sname = b"".join(packed[k]) + b"\xff"
        overload |= 2
    if overload:
        pos = 1 if main and main[0][0] == 53 else 0
        main.insert(pos, bytes((52, 1, overload)))
    head = _HDR.pack(
        msg.op, msg.htype, msg.hlen, msg.hops, msg.xid, msg.secs, msg.flags,
        msg.ciaddr, msg.yiaddr, msg.siaddr, msg.giaddr, msg.chaddr, sname, file,
    )  # fmt: skip
    out = b"".join((head, MAGIC_COOKIE, *main, b"\xff"))
    if len(out) < _BOOTP_MIN_LEN:
        out += _PAD300[len(out) :]
    return out


def encode_reply(
    reply: DhcpMessage, request: DhcpMessage, *, mandatory: Collection[int] = DEFAULT_MANDATORY
) -> bytes:
    """Encode a reply honouring the request's parameter request list (55) and size (57)."""
    ropts = request.options
    mms = ropts.get(57)
    return encode(
        reply,
        prl=ropts.get(55),
        max_message_size=(mms[0] << 8) | mms[1] if mms is not None and len(mms) == 2 else None,
        mandatory=mandatory,
    )


def make_reply(
    request: DhcpMessage,
    msg_type: int,
    *,
    yiaddr: AddressLike = ZERO_IP,
    siaddr: AddressLike = ZERO_IP,
    server_id: AddressLike | None = None,
    sname: bytes = b"",
    file: bytes = b"",
    options: Mapping[int, bytes] | None = None,
) -> DhcpMessage:
    """Build a BOOTREPLY for ``request`` (RFC 2131 table 3).

    Copies htype/hlen/xid/flags/giaddr/chaddr, ciaddr for ACK; sets 53 and 54; echoes the relay
    agent information (82) verbatim. ``options`` (raw values) are added after those.
    """
    reply = _new_message(DhcpMessage)
    reply.op = BOOTREPLY
    reply.htype = request.htype
    reply.hlen = request.hlen
    reply.hops = 0
    reply.xid = request.xid
    reply.secs = 0
    reply.flags = request.flags
    reply.ciaddr = request.ciaddr if msg_type == 5 else ZERO_IP
    reply.yiaddr = yiaddr if type(yiaddr) is bytes and len(yiaddr) == 4 else ip_bytes(yiaddr)
    reply.siaddr = siaddr if type(siaddr) is bytes and len(siaddr) == 4 else ip_bytes(siaddr)
    reply.giaddr = request.giaddr
    reply.chaddr = request.chaddr
    reply.sname = sname
    reply.file = file
    reply.overload = 0
    opts = {53: _MSG_TYPE_BYTES[msg_type] if 0 < msg_type < 256 else bytes((msg_type,))}
    if server_id is not None:
        opts[54] = ip_bytes(server_id)
    if options:
        opts.update(options)
    rai = request.options.get(82)
    if rai is not None:
        opts[82] = rai
    reply.options = opts
    return reply


_MSG_TYPE_BYTES = [bytes((i,)) for i in range(256)]


def encode_ipxe_encap(subs: Mapping[int, bytes] | None = None, *, no_pxedhcp: bool = True) -> bytes:
    """Option-175 value: iPXE sub-options, by default just 176 no-pxedhcp = 1."""
    d: dict[int, bytes] = {}
    if no_pxedhcp:
        d[IpxeOpt.NO_PXEDHCP] = b"\x01"
    if subs:
        d.update(subs)
    return encode_suboptions(d)


# --------------------------------------------------------------------------- message


def _str(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "replace")


def _enc_str(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def _enc_msg_type(v: int) -> bytes:
    if not 0 < v < 256:
        raise EncodeError("message type out of range")
    return bytes((v,))


def _dec_msg_type(raw: bytes) -> MessageType | int:
    if len(raw) != 1:
        raise MalformedPacket("message type length != 1")
    try:
        return MessageType(raw[0])
    except ValueError:
        return raw[0]


def _enc_arch(v: int | Iterable[int]) -> bytes:
    return encode_u16(v) if isinstance(v, int) else encode_client_arch(v)


def _dec_ndi(raw: bytes) -> tuple[int, int, int]:
    if len(raw) != 3:
        raise MalformedPacket("client NDI length != 3")
    return raw[0], raw[1], raw[2]


def _enc_ndi(v: tuple[int, int, int]) -> bytes:
    return bytes(v)


def _dec_guid(raw: bytes) -> bytes:
    if len(raw) != 17:
        raise MalformedPacket("client UUID/GUID length != 17")
    return raw[1:]


def _enc_guid(v: Any) -> bytes:
    b = getattr(v, "bytes", v)  # uuid.UUID or 16 raw bytes
    if not isinstance(b, bytes) or len(b) != 16:
        raise EncodeError("GUID must be 16 bytes or a uuid.UUID")
    return b"\x00" + b


def _enc_user_class(v: bytes | Iterable[bytes]) -> bytes:
    # bytes -> sent raw (as iPXE does); a list -> RFC 3004 length-prefixed.
    return bytes(v) if isinstance(v, bytes | bytearray) else encode_user_class(list(v))


def _dec_prl(raw: bytes) -> list[int]:
    return list(raw)


def _enc_prl(v: Iterable[int]) -> bytes:
    try:
        return bytes(v)
    except (ValueError, TypeError) as exc:
        raise EncodeError("bad parameter request list") from exc


def _dec_mms(raw: bytes) -> int:
    return decode_u16(raw)


def _opt(code: int, dec: Any, enc: Any, doc: str) -> property:
    def fget(self: DhcpMessage) -> Any:
        raw = self.options.get(code)
        return None if raw is None else dec(raw)

    def fset(self: DhcpMessage, value: Any) -> None:
        if value is None:
            self.options.pop(code, None)
        else:
            self.options[code] = enc(value)

    return property(fget, fset, None, f"Option {code}: {doc} (None if absent).")


def _raw(b: bytes) -> bytes:
    return b


class DhcpMessage:
    """A BOOTP/DHCPv4 message.

    Header address fields (ciaddr, yiaddr, siaddr, giaddr) are 4 raw network-order bytes;
    chaddr is up to 16 raw bytes (``mac`` gives chaddr[:hlen]); sname/file are raw bytes
    without NUL padding. ``options`` maps option code -> raw value (no 0/52/255). Typed
    properties read/write ``options``; getters return None if the option is absent and raise
    :class:`MalformedPacket` if its value is malformed; setting None removes the option.
    """

    __slots__ = (
        "chaddr",
        "ciaddr",
        "file",
        "flags",
        "giaddr",
        "hlen",
        "hops",
        "htype",
        "op",
        "options",
        "overload",
        "secs",
        "siaddr",
        "sname",
        "xid",
        "yiaddr",
    )  # fmt: skip

    op: int
    htype: int
    hlen: int
    hops: int
    xid: int
    secs: int
    flags: int
    ciaddr: bytes
    yiaddr: bytes
    siaddr: bytes
    giaddr: bytes
    chaddr: bytes
    sname: bytes
    file: bytes
    options: dict[int, bytes]
    overload: int  # option-52 value seen on decode (0 = none); ignored by encode

    def __init__(
        self,
        op: int = BOOTREQUEST,
        *,
        htype: int = 1,
        hlen: int = 6,
        hops: int = 0,
        xid: int = 0,
        secs: int = 0,
        flags: int = 0,
        ciaddr: AddressLike = ZERO_IP,
        yiaddr: AddressLike = ZERO_IP,
        siaddr: AddressLike = ZERO_IP,
        giaddr: AddressLike = ZERO_IP,
        chaddr: bytes = b"",
        sname: bytes = b"",
        file: bytes = b"",
        options: Mapping[int, bytes] | None = None,
    ) -> None:
        self.op = op
        self.htype = htype
        self.hlen = hlen
        self.hops = hops
        self.xid = xid
        self.secs = secs
        self.flags = flags
        self.ciaddr = ip_bytes(ciaddr)
        self.yiaddr = ip_bytes(yiaddr)
        self.siaddr = ip_bytes(siaddr)
        self.giaddr = ip_bytes(giaddr)
        self.chaddr = chaddr
        self.sname = sname
        self.file = file
        self.options = dict(options) if options else {}
        self.overload = 0

    def to_bytes(self, **kw: Any) -> bytes:
        """Same as :func:`encode` (msg, **kw)."""
        return encode(self, **kw)

    def _key(self) -> tuple[Any, ...]:
        return (
            self.op, self.htype, self.hlen, self.hops, self.xid, self.secs, self.flags,
            self.ciaddr, self.yiaddr, self.siaddr, self.giaddr, self.chaddr.ljust(16, b"\0"),
            self.server_name, self.boot_file, self.options,
        )  # fmt: skip

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DhcpMessage):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        mt = self.options.get(53)
        kind = mt[0] if mt and len(mt) == 1 else None
        try:
            kind = MessageType(kind).name if kind is not None else "BOOTP"
        except ValueError:
            pass
        return (
            f"<DhcpMessage {kind} op={self.op} xid={self.xid:#010x} "
            f"chaddr={self.mac.hex(':')} options={sorted(self.options)}>"
        )

    # ----------------------------------------------------------------- header helpers

    @property
    def mac(self) -> bytes:
        """Client hardware address: chaddr[:hlen]."""
        return self.chaddr[: self.hlen]

    @property
    def broadcast(self) -> bool:
        """BROADCAST bit of flags (RFC 1542 / 2131)."""
        return bool(self.flags & BROADCAST_FLAG)

    @broadcast.setter
    def broadcast(self, value: bool) -> None:
        self.flags = (self.flags | BROADCAST_FLAG) if value else (self.flags & ~BROADCAST_FLAG)

    @property
    def server_name(self) -> bytes:
        """sname up to the first NUL (b"" if it carried overloaded options)."""
        return self.sname.split(b"\x00", 1)[0]

    @property
    def boot_file(self) -> bytes:
        """file up to the first NUL (b"" if it carried overloaded options)."""
        return self.file.split(b"\x00", 1)[0]

    def ip(self, field: str) -> IPv4Address:
        """A header address field as IPv4Address, e.g. ``msg.ip("yiaddr")``."""
        return IPv4Address(getattr(self, field))

    @property
    def is_pxe_client(self) -> bool:
        vc = self.options.get(60)
        return vc is not None and vc.startswith(b"PXEClient")

    @property
    def is_ipxe(self) -> bool:
        return _is_ipxe(self.options)

    # ----------------------------------------------------------------- typed options

    message_type = _opt(53, _dec_msg_type, _enc_msg_type, "DHCP message type (MessageType)")
    requested_ip = _opt(50, decode_ip, ip_bytes, "requested IP address")
    lease_time = _opt(51, decode_u32, encode_u32, "lease time, seconds")
    server_id = _opt(54, decode_ip, ip_bytes, "server identifier")
    parameter_request_list = _opt(55, _dec_prl, _enc_prl, "parameter request list (codes)")
    message = _opt(56, _str, _enc_str, "error message")
    max_message_size = _opt(57, _dec_mms, encode_u16, "maximum DHCP message size")
    renewal_time = _opt(58, decode_u32, encode_u32, "renewal (T1) time, seconds")
    rebinding_time = _opt(59, decode_u32, encode_u32, "rebinding (T2) time, seconds")
    vendor_class = _opt(60, _raw, _enc_str, "vendor class identifier (raw bytes)")
    client_id = _opt(61, _raw, bytes, "client identifier (raw, type byte first)")
    user_class = _opt(
        77, decode_user_class, _enc_user_class,
        "user classes (list; bytes value set raw like iPXE, list set RFC 3004)",
    )  # fmt: skip
    relay_agent_info = _opt(82, _raw, bytes, "relay agent information (raw, echo verbatim)")
    client_arch = _opt(93, decode_client_arch, _enc_arch, "client system architectures")
    client_ndi = _opt(94, _dec_ndi, _enc_ndi, "client NDI (type, major, minor)")
    client_guid = _opt(97, _dec_guid, _enc_guid, "client UUID/GUID (16 bytes, type 0)")
    hostname = _opt(12, _str, _enc_str, "host name")
    subnet_mask = _opt(1, decode_ip, ip_bytes, "subnet mask")
    routers = _opt(3, decode_ip_list, encode_ip_list, "routers")
    dns_servers = _opt(6, decode_ip_list, encode_ip_list, "DNS servers")
    domain_name = _opt(15, _str, _enc_str, "domain name")
    broadcast_address = _opt(28, decode_ip, ip_bytes, "broadcast address")
    tftp_server_name = _opt(66, _str, _enc_str, "TFTP server name")
    bootfile_name = _opt(67, _str, _enc_str, "bootfile name")
    pxe_vendor = _opt(
        43, decode_pxe_vendor, _raw, "PXE vendor options (set with encode_pxe_vendor bytes)"
    )
    ipxe_options = _opt(175, decode_suboptions, encode_suboptions, "iPXE encapsulated sub-options")


# --------------------------------------------------------------------------- classifier


def _is_ipxe(opts: Mapping[int, bytes]) -> bool:
    if 175 in opts:
        return True
    uc = opts.get(77)
    if uc is None:
        return False
    # iPXE sends the raw string "iPXE"; also accept it inside an RFC 3004 list.
    return uc == b"iPXE" or b"iPXE" in decode_user_class(uc)


def _first_arch(msg: DhcpMessage, vc: bytes) -> int | None:
    raw = msg.options.get(93)
    if raw is not None and len(raw) >= 2:
        return (raw[0] << 8) | raw[1]
    # Fallback: "PXEClient:Arch:xxxxx:..." / "HTTPClient:Arch:xxxxx:..."
    fields = vc.split(b":")
    if len(fields) >= 3 and fields[1] == b"Arch" and fields[2].isdigit():
        return int(fields[2])
    return None


def classify_client(msg: DhcpMessage) -> Firmware:
    """Classify the booting firmware from options 60, 77, 93 and 175. Never raises.

    A PXE or HTTP boot client takes its architecture's slot (bootherd.firmware); one
    naming an architecture the registry lacks is Firmware.UNKNOWN (refused)."""
    opts = msg.options
    if _is_ipxe(opts):
        return Firmware.IPXE
    vc = opts.get(60)
    if vc is None:
        return Firmware.OTHER
    if vc.startswith(b"HTTPClient"):
        return pxe_firmware(_first_arch(msg, vc), http=True)
    if vc.startswith(b"PXEClient"):
        return pxe_firmware(_first_arch(msg, vc), http=False)
    return Firmware.OTHER
