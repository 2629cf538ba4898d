"""DHCPv4 option codes and value codecs (RFC 2132, 3004, 3046, 3396, 4578; PXE 2.1; iPXE).

Everything here works on raw ``bytes`` option values as stored in
:attr:`bootherd.dhcp.codec.DhcpMessage.options` (a ``dict[int, bytes]``).
Decoders raise :class:`MalformedPacket` on bad values, never anything else.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address

from bootherd.firmware import ClientArch

__all__ = [
    "AddressLike",
    "ClientArch",
    "EncodeError",
    "IpxeOpt",
    "MalformedPacket",
    "MessageType",
    "Opt",
    "PxeBootMenuItem",
    "PxeBootServer",
    "PxeOpt",
    "PxeVendorOptions",
    "decode_client_arch",
    "decode_ip",
    "decode_ip_list",
    "decode_pxe_vendor",
    "decode_suboptions",
    "decode_u16",
    "decode_u32",
    "decode_user_class",
    "encode_client_arch",
    "encode_ip",
    "encode_ip_list",
    "encode_pxe_vendor",
    "encode_suboptions",
    "encode_u16",
    "encode_u32",
    "encode_user_class",
    "ip_bytes",
]


class MalformedPacket(ValueError):
    """The packet (or an option value) is not valid DHCP/BOOTP. ``str(exc)`` is a short reason."""


class EncodeError(ValueError):
    """A message cannot be encoded (field too long, mandatory options exceed the size limit...)."""


class Opt(IntEnum):
    """DHCP option codes used by bootherd (RFC 2132 unless noted)."""

    PAD = 0
    SUBNET_MASK = 1
    ROUTER = 3
    DNS_SERVERS = 6
    HOSTNAME = 12
    DOMAIN_NAME = 15
    BROADCAST_ADDRESS = 28
    VENDOR_SPECIFIC = 43
    REQUESTED_IP = 50
    LEASE_TIME = 51
    OVERLOAD = 52
    MESSAGE_TYPE = 53
    SERVER_ID = 54
    PARAMETER_REQUEST_LIST = 55
    MESSAGE = 56
    MAX_MESSAGE_SIZE = 57
    RENEWAL_TIME = 58
    REBINDING_TIME = 59
    VENDOR_CLASS = 60
    CLIENT_ID = 61
    TFTP_SERVER_NAME = 66
    BOOTFILE_NAME = 67
    USER_CLASS = 77  # RFC 3004
    RELAY_AGENT_INFO = 82  # RFC 3046
    CLIENT_ARCH = 93  # RFC 4578
    CLIENT_NDI = 94  # RFC 4578
    UUID_GUID = 97  # RFC 4578
    IPXE_ENCAP = 175  # iPXE encapsulated options
    END = 255


class MessageType(IntEnum):
    """Option 53 values (RFC 2132 9.6, RFC 3203, RFC 4388)."""

    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8
    FORCERENEW = 9
    LEASEQUERY = 10
    LEASEUNASSIGNED = 11
    LEASEUNKNOWN = 12
    LEASEACTIVE = 13


class PxeOpt(IntEnum):
    """Sub-options of option 43 for PXE clients (PXE 2.1 spec) plus bootherd's site option."""

    DISCOVERY_CONTROL = 6
    BOOT_SERVERS = 8
    BOOT_MENU = 9
    MENU_PROMPT = 10
    BOOT_ITEM = 71
    BOOTINFO_SERVER = 128  # site-specific: IPv4 address of the bootinfo server


class IpxeOpt(IntEnum):
    """Sub-options of option 175 (iPXE encapsulated options)."""

    PRIORITY = 1
    KEEP_SAN = 8
    SKIP_SAN_BOOT = 9
    FEATURE_PXE_EXT = 16
    FEATURE_ISCSI = 17
    FEATURE_AOE = 18
    FEATURE_HTTP = 19
    FEATURE_HTTPS = 20
    FEATURE_TFTP = 21
    FEATURE_FTP = 22
    FEATURE_DNS = 23
    FEATURE_BZIMAGE = 24
    FEATURE_MULTIBOOT = 25
    FEATURE_SLAM = 26
    FEATURE_SRP = 27
    FEATURE_NBI = 32
    FEATURE_PXE = 33
    FEATURE_ELF = 34
    FEATURE_COMBOOT = 35
    FEATURE_EFI = 36
    FEATURE_FCOE = 37
    FEATURE_VLAN = 38
    FEATURE_MENU = 39
    FEATURE_SDI = 40
    FEATURE_NFS = 41
    NO_PXEDHCP = 176
    BUS_ID = 177
    BIOS_DRIVE = 189
    USERNAME = 190
    PASSWORD = 191
    VERSION = 235


# --------------------------------------------------------------------------- scalars

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

AddressLike = IPv4Address | str | bytes | int


def ip_bytes(addr: AddressLike) -> bytes:
    """Convert an IPv4 address (IPv4Address, dotted str, 4 bytes or int) to 4 network-order bytes."""
    if isinstance(addr, bytes):
        if len(addr) != 4:
            raise EncodeError(f"IPv4 address must be 4 bytes, got {len(addr)}")
        return addr
    if isinstance(addr, IPv4Address):
        return addr.packed
    try:
        return ipaddress.IPv4Address(addr).packed
    except (ValueError, TypeError) as exc:
        raise EncodeError(f"bad IPv4 address {addr!r}") from exc


def encode_ip(addr: AddressLike) -> bytes:
    return ip_bytes(addr)


def encode_ip_list(addrs: Iterable[AddressLike]) -> bytes:
    return b"".join(ip_bytes(a) for a in addrs)


def decode_ip(raw: bytes) -> IPv4Address:
    if len(raw) != 4:
        raise MalformedPacket("address option length != 4")
    return IPv4Address(raw)


def decode_ip_list(raw: bytes) -> list[IPv4Address]:
    n = len(raw)
    if n == 0 or n % 4:
        raise MalformedPacket("address list length not a multiple of 4")
    return [IPv4Address(raw[i : i + 4]) for i in range(0, n, 4)]


def encode_u16(value: int) -> bytes:
    try:
        return _U16.pack(value)
    except struct.error as exc:
        raise EncodeError(f"uint16 out of range: {value!r}") from exc


def encode_u32(value: int) -> bytes:
    try:
        return _U32.pack(value)
    except struct.error as exc:
        raise EncodeError(f"uint32 out of range: {value!r}") from exc


def decode_u16(raw: bytes) -> int:
    if len(raw) != 2:
        raise MalformedPacket("uint16 option length != 2")
    return (raw[0] << 8) | raw[1]


def decode_u32(raw: bytes) -> int:
    if len(raw) != 4:
        raise MalformedPacket("uint32 option length != 4")
    return int.from_bytes(raw, "big")


# --------------------------------------------------------------------------- option 93


def decode_client_arch(raw: bytes) -> list[int]:
    """Option 93: list of uint16 architecture types (RFC 4578 2.1)."""
    n = len(raw)
    if n == 0 or n % 2:
        raise MalformedPacket("client arch length not a multiple of 2")
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, n, 2)]


def encode_client_arch(arches: Iterable[int]) -> bytes:
    return b"".join(encode_u16(a) for a in arches)


# --------------------------------------------------------------------------- option 77


def decode_user_class(raw: bytes) -> list[bytes]:
    """Option 77 as a list of user classes.

    RFC 3004 form (``len data len data ...``) is used when the value parses exactly as such;
    otherwise the whole value is one class (iPXE sends plain ``iPXE``, not length-prefixed).
    """
    out: list[bytes] = []
    i, n = 0, len(raw)
    while i < n:
        ln = raw[i]
        j = i + 1 + ln
        if ln == 0 or j > n:
            return [raw] if raw else []
        out.append(raw[i + 1 : j])
        i = j
    return out


def encode_user_class(classes: Sequence[bytes] | bytes, *, rfc3004: bool = True) -> bytes:
    """Encode option 77: RFC 3004 length-prefixed list, or one raw value (``rfc3004=False``)."""
    if isinstance(classes, bytes):
        classes = [classes]
    if not rfc3004:
        return b"".join(classes)
    parts = []
    for c in classes:
        if not 0 < len(c) <= 255:
            raise EncodeError("user class length must be 1..255")
        parts.append(bytes((len(c),)) + c)
    return b"".join(parts)


# --------------------------------------------------------------------------- sub-options


def decode_suboptions(raw: bytes) -> dict[int, bytes]:
    """Decode an encapsulated option space (43, 82, 175): code/len/value with pad 0 and end 255.

    Repeated sub-options are concatenated (RFC 3396 style).
    """
    out: dict[int, bytes] = {}
    i, n = 0, len(raw)
    while i < n:
        code = raw[i]
        if code == 0:
            i += 1
            continue
        if code == 255:
            break
        if i + 1 >= n:
            raise MalformedPacket("truncated sub-option")
        j = i + 2 + raw[i + 1]
        if j > n:
            raise MalformedPacket("sub-option overruns its option")
        val = raw[i + 2 : j]
        prev = out.get(code)
        out[code] = val if prev is None else prev + val
        i = j
    return out


def encode_suboptions(subs: Mapping[int, bytes], *, end: bool = False) -> bytes:
    """Encode sub-options (values > 255 bytes are split into several instances)."""
    parts = []
    for code, val in subs.items():
        if not 0 < code < 255:
            raise EncodeError(f"bad sub-option code {code}")
        val = bytes(val)
        if not val:
            parts.append(bytes((code, 0)))
        for k in range(0, len(val), 255):
            chunk = val[k : k + 255]
            parts.append(bytes((code, len(chunk))) + chunk)
    if end:
        parts.append(b"\xff")
    return b"".join(parts)


# --------------------------------------------------------------------------- PXE (option 43)


@dataclass(slots=True)
class PxeBootServer:
    type: int
    addresses: list[IPv4Address]


@dataclass(slots=True)
class PxeBootMenuItem:
    type: int
    description: bytes


@dataclass(slots=True)
class PxeVendorOptions:
    """Option 43 for PXE clients, decoded. Unknown sub-options are kept raw in ``other``."""

    discovery_control: int | None = None
    boot_servers: list[PxeBootServer] = field(default_factory=list)
    boot_menu: list[PxeBootMenuItem] = field(default_factory=list)
    menu_prompt: tuple[int, bytes] | None = None  # (timeout seconds, prompt)
    boot_item: tuple[int, int] | None = None  # (type, layer)
    bootinfo_server: IPv4Address | None = None  # site sub-option 128
    other: dict[int, bytes] = field(default_factory=dict)


def decode_pxe_vendor(raw: bytes) -> PxeVendorOptions:
    subs = decode_suboptions(raw)
    out = PxeVendorOptions()
    for code, val in subs.items():
        if code == PxeOpt.DISCOVERY_CONTROL:
            if len(val) != 1:
                raise MalformedPacket("PXE discovery control length != 1")
            out.discovery_control = val[0]
        elif code == PxeOpt.BOOT_SERVERS:
            i, n = 0, len(val)
            while i < n:
                if i + 3 > n:
                    raise MalformedPacket("truncated PXE boot server")
                typ = (val[i] << 8) | val[i + 1]
                cnt = val[i + 2]
                j = i + 3 + 4 * cnt
                if j > n:
                    raise MalformedPacket("truncated PXE boot server list")
                ips = [IPv4Address(val[k : k + 4]) for k in range(i + 3, j, 4)]
                out.boot_servers.append(PxeBootServer(typ, ips))
                i = j
        elif code == PxeOpt.BOOT_MENU:
            i, n = 0, len(val)
            while i < n:
                if i + 3 > n:
                    raise MalformedPacket("truncated PXE boot menu")
                typ = (val[i] << 8) | val[i + 1]
                j = i + 3 + val[i + 2]
                if j > n:
                    raise MalformedPacket("truncated PXE boot menu item")
                out.boot_menu.append(PxeBootMenuItem(typ, val[i + 3 : j]))
                i = j
        elif code == PxeOpt.MENU_PROMPT:
            if not val:
                raise MalformedPacket("empty PXE menu prompt")
            out.menu_prompt = (val[0], val[1:])
        elif code == PxeOpt.BOOT_ITEM:
            if len(val) != 4:
                raise MalformedPacket("PXE boot item length != 4")
            out.boot_item = ((val[0] << 8) | val[1], (val[2] << 8) | val[3])
        elif code == PxeOpt.BOOTINFO_SERVER:
            out.bootinfo_server = decode_ip(val)
        else:
            out.other[code] = val
    return out


def encode_pxe_vendor(
    *,
    discovery_control: int | None = None,
    boot_servers: Iterable[tuple[int, Sequence[AddressLike]]] = (),
    boot_menu: Iterable[tuple[int, bytes | str]] = (),
    menu_prompt: tuple[int, bytes | str] | None = None,
    boot_item: tuple[int, int] | None = None,
    bootinfo_server: AddressLike | None = None,
    other: Mapping[int, bytes] | None = None,
) -> bytes:
    """Build the option-43 value for PXE clients (sub-options then END)."""
    subs: dict[int, bytes] = {}
    if discovery_control is not None:
        if not 0 <= discovery_control <= 255:
            raise EncodeError("discovery control must fit one byte")
        subs[PxeOpt.DISCOVERY_CONTROL] = bytes((discovery_control,))
    servers = b"".join(
        encode_u16(t) + bytes((len(ips),)) + encode_ip_list(ips) for t, ips in boot_servers
    )
    if servers:
        subs[PxeOpt.BOOT_SERVERS] = servers
    menu = []
    for t, desc in boot_menu:
        d = desc.encode() if isinstance(desc, str) else desc
        if len(d) > 255:
            raise EncodeError("PXE menu description > 255 bytes")
        menu.append(encode_u16(t) + bytes((len(d),)) + d)
    if menu:
        subs[PxeOpt.BOOT_MENU] = b"".join(menu)
    if menu_prompt is not None:
        timeout, prompt = menu_prompt
        p = prompt.encode() if isinstance(prompt, str) else prompt
        if not 0 <= timeout <= 255:
            raise EncodeError("menu prompt timeout must fit one byte")
        subs[PxeOpt.MENU_PROMPT] = bytes((timeout,)) + p
    if boot_item is not None:
        subs[PxeOpt.BOOT_ITEM] = encode_u16(boot_item[0]) + encode_u16(boot_item[1])
    if bootinfo_server is not None:
        subs[PxeOpt.BOOTINFO_SERVER] = ip_bytes(bootinfo_server)
    if other:
        subs.update(other)
    return encode_suboptions(subs, end=True)
