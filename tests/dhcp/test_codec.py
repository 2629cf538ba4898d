"""Tests for bootherd.dhcp.codec against packets built byte by byte from the RFC layouts.

The ``*_packet()`` builders below are also imported by the other test_codec*.py files.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from bootherd.dhcp.codec import (
    BOOTREPLY,
    DhcpMessage,
    EncodeError,
    Firmware,
    MalformedPacket,
    MessageType,
    classify_client,
    decode,
    encode,
    encode_ipxe_encap,
    encode_reply,
    make_reply,
)
from bootherd.dhcp.options import (
    PxeBootMenuItem,
    PxeBootServer,
    decode_pxe_vendor,
    decode_suboptions,
    decode_user_class,
    encode_pxe_vendor,
    encode_user_class,
)

# --------------------------------------------------------------------------- byte builders

MAC = bytes.fromhex("525400123456")
GUID = bytes.fromhex("8a4b1e2f0c3d4e5f60718293a4b5c6d7")
COOKIE = bytes([99, 130, 83, 99])


def opt(code: int, payload: bytes) -> bytes:
    """One option TLV, RFC 2132 section 2: code, length, data."""
    assert len(payload) <= 255
    return bytes([code, len(payload)]) + payload


def header(
    *,
    op: int = 1,
    xid: int = 0x1A2B3C4D,
    secs: int = 4,
    flags: int = 0x0000,
    hops: int = 0,
    ciaddr: bytes = b"\0\0\0\0",
    yiaddr: bytes = b"\0\0\0\0",
    siaddr: bytes = b"\0\0\0\0",
    giaddr: bytes = b"\0\0\0\0",
    chaddr: bytes = MAC,
    sname: bytes = b"",
    file: bytes = b"",
) -> bytes:
    """RFC 2131 figure 1, field by field."""
    out = bytes([op, 1, 6, hops])  # op, htype=ethernet, hlen=6, hops
    out += xid.to_bytes(4, "big") + secs.to_bytes(2, "big") + flags.to_bytes(2, "big")
    out += ciaddr + yiaddr + siaddr + giaddr
    out += chaddr + bytes(16 - len(chaddr))
    out += sname + bytes(64 - len(sname))
    out += file + bytes(128 - len(file))
    assert len(out) == 236
    return out


IPXE_PRL = bytes(
    [1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 129, 130, 131, 132, 133, 134, 135]
    + [175, 203]
)
IPXE_FEATURES = (
    opt(0xB1, bytes([1, 0x80, 0x86, 0x10, 0x0E]))  # bus-id: PCI 8086:100e
    + opt(0xEB, bytes([1, 21, 1]))  # version 1.21.1
    + opt(0x13, b"\x01")  # http
    + opt(0x15, b"\x01")  # tftp
    + opt(0x17, b"\x01")  # dns
    + opt(0x18, b"\x01")  # bzimage
    + opt(0x21, b"\x01")  # pxe
    + opt(0x27, b"\x01")  # menu
)


def ipxe_discover_packet() -> bytes:
    """A DHCPDISCOVER as iPXE (BIOS, undionly) sends it."""
    return (
        header(flags=0x8000)
        + COOKIE
        + opt(53, b"\x01")
        + opt(57, b"\x05\xc0")  # 1472
        + opt(93, b"\x00\x00")  # x86 BIOS
        + opt(94, b"\x01\x02\x01")  # UNDI 2.1
        + opt(60, b"PXEClient:Arch:00000:UNDI:002001")
        + opt(77, b"iPXE")  # raw, not RFC 3004 length-prefixed
        + opt(55, IPXE_PRL)
        + opt(175, IPXE_FEATURES)
        + opt(61, b"\x01" + MAC)
        + opt(97, b"\x00" + GUID)
        + b"\xff"
    )


def ovmf_discover_packet() -> bytes:
    """A DHCPDISCOVER from OVMF (EDK2 PXE, x64 UEFI, arch 7)."""
    prl = bytes([1, 2, 3, 4, 5, 6, 12, 13, 15, 17, 18, 22, 23, 28, 40, 41, 42, 43, 50, 51])
    prl += bytes([54, 58, 59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135])
    return (
        header(xid=0x0BADCAFE, secs=0)
        + COOKIE
        + opt(53, b"\x01")
        + opt(57, b"\x05\xc0")
        + opt(55, prl)
        + opt(97, b"\x00" + GUID)
        + opt(94, b"\x01\x03\x00")
        + opt(93, b"\x00\x07")
        + opt(60, b"PXEClient:Arch:00007:UNDI:003000")
        + b"\xff"
    )


def http_discover_packet(arch: int = 16) -> bytes:
    """A DHCPDISCOVER from UEFI HTTP boot (RFC 4578 arch 16 = x64 UEFI HTTP)."""
    return (
        header(xid=0x00C0FFEE)
        + COOKIE
        + opt(53, b"\x01")
        + opt(57, b"\x05\xdc")
        + opt(55, bytes([1, 3, 6, 15, 43, 60, 66, 67, 97]))
        + opt(97, b"\x00" + GUID)
        + opt(94, b"\x01\x03\x00")
        + opt(93, arch.to_bytes(2, "big"))
        + opt(60, b"HTTPClient:Arch:%05d:UNDI:003000" % arch)
        + b"\xff"
        + bytes(20)  # trailing pad after END, as many clients send
    )


def relayed_request_packet() -> bytes:
    """A DHCPREQUEST relayed by a giaddr agent with option 82 (RFC 3046)."""
    rai = opt(1, b"eth0/1/3") + opt(2, b"\x00\x11\x22\x33\x44\x55")
    return (
        header(op=1, hops=1, ciaddr=bytes([10, 1, 2, 30]), giaddr=bytes([10, 1, 2, 1]))
        + COOKIE
        + opt(53, b"\x03")
        + opt(50, bytes([10, 1, 2, 30]))
        + opt(54, bytes([10, 1, 0, 1]))
        + opt(12, b"node17")
        + opt(55, bytes([1, 3, 6, 15, 28, 51, 58, 59]))
        + opt(82, rai)
        + b"\xff"
    )


def overloaded_packet() -> bytes:
    """Options carried in options, file and sname (RFC 2131 option 52 = 3), with a long
    option split over three instances across fields (RFC 3396)."""
    file_area = opt(12, b"from-file") + opt(43, b"B" * 10) + b"\xff"
    sname_area = opt(43, b"C" * 5) + opt(15, b"example.org") + b"\xff"
    return (
        header(op=2, sname=sname_area, file=file_area)
        + COOKIE
        + opt(53, b"\x02")
        + opt(52, b"\x03")
        + opt(43, b"A" * 255)
        + b"\xff"
    )


ALL_FIXTURES = [
    ipxe_discover_packet,
    ovmf_discover_packet,
    http_discover_packet,
    relayed_request_packet,
    overloaded_packet,
]


def tlvs(data: bytes, start: int = 240) -> list[tuple[int, bytes]]:
    """Independent option walker for assertions on encoded bytes."""
    out, i = [], start
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        out.append((data[i], data[i + 2 : i + 2 + data[i + 1]]))
        i += 2 + data[i + 1]
    return out


# --------------------------------------------------------------------------- decoding fixtures


def test_ipxe_discover_fields_and_accessors():
    m = decode(ipxe_discover_packet())
    assert m.op == 1 and m.htype == 1 and m.hlen == 6 and m.hops == 0
    assert m.xid == 0x1A2B3C4D and m.secs == 4
    assert m.broadcast is True and m.flags == 0x8000
    assert m.mac == MAC and m.chaddr == MAC + bytes(10)
    assert m.ciaddr == m.yiaddr == m.siaddr == m.giaddr == b"\0\0\0\0"
    assert m.sname == b"" and m.file == b""
    assert m.message_type is MessageType.DISCOVER
    assert m.max_message_size == 1472
    assert m.client_arch == [0]
    assert m.client_ndi == (1, 2, 1)
    assert m.vendor_class == b"PXEClient:Arch:00000:UNDI:002001"
    assert m.options[77] == b"iPXE"
    assert m.user_class == [b"iPXE"]
    assert m.parameter_request_list == list(IPXE_PRL)
    assert m.client_id == b"\x01" + MAC
    assert m.client_guid == GUID
    feats = m.ipxe_options
    assert feats[0xEB] == bytes([1, 21, 1]) and feats[0x13] == b"\x01"
    assert list(m.options) == [53, 57, 93, 94, 60, 77, 55, 175, 61, 97]
    assert m.is_pxe_client and m.is_ipxe
    assert classify_client(m) is Firmware.IPXE


def test_ovmf_and_http_and_bios_classification():
    assert classify_client(decode(ovmf_discover_packet())) is Firmware.UEFI_X64
    m = decode(http_discover_packet())
    assert m.client_arch == [16]
    assert classify_client(m) is Firmware.UEFI_HTTP
    assert classify_client(decode(http_discover_packet(19))) is Firmware.UEFI_HTTP_ARM64
    assert classify_client(decode(http_discover_packet(18))) is Firmware.UEFI_HTTP_ARM32


@pytest.mark.parametrize(
    ("opts", "kind"),
    [
        ({60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\0\0"}, Firmware.BIOS_PXE),
        ({60: b"PXEClient:Arch:00007:UNDI:003000", 93: b"\0\x07"}, Firmware.UEFI_X64),
        ({60: b"PXEClient:Arch:00009:UNDI:003000", 93: b"\0\x09"}, Firmware.UEFI_X64),
        ({60: b"PXEClient:Arch:00011:UNDI:003000", 93: b"\0\x0b"}, Firmware.UEFI_ARM64),
        ({60: b"PXEClient:Arch:00007:UNDI:003000"}, Firmware.UEFI_X64),  # no 93: from 60
        ({60: b"PXEClient"}, Firmware.BIOS_PXE),  # pre-RFC 4578 ROM
        ({60: b"PXEClient:Arch:00006:UNDI:003000", 93: b"\0\x06"}, Firmware.UEFI_IA32),
        ({60: b"PXEClient:Arch:00099:UNDI:003000", 93: b"\0\x63"}, Firmware.UNKNOWN),
        ({60: b"HTTPClient:Arch:00016:UNDI:003000", 93: b"\0\x10"}, Firmware.UEFI_HTTP),
        ({60: b"HTTPClient:Arch:00016"}, Firmware.UEFI_HTTP),
        ({60: b"PXEClient:Arch:00000", 77: b"iPXE"}, Firmware.IPXE),
        ({60: b"PXEClient:Arch:00007", 175: b""}, Firmware.IPXE),
        ({77: b"\x04iPXE\x03foo"}, Firmware.IPXE),  # RFC 3004 form
        ({60: b"MSFT 5.0"}, Firmware.OTHER),
        ({}, Firmware.OTHER),
        ({60: b"PXEClient", 93: b"\x00"}, Firmware.BIOS_PXE),  # malformed 93 ignored
    ],
)
def test_classify_client(opts, kind):
    assert classify_client(DhcpMessage(options=opts)) is kind


def test_relayed_request():
    m = decode(relayed_request_packet())
    assert m.hops == 1 and m.giaddr == bytes([10, 1, 2, 1])
    assert m.ip("ciaddr") == IPv4Address("10.1.2.30")
    assert m.message_type is MessageType.REQUEST
    assert m.requested_ip == IPv4Address("10.1.2.30")
    assert m.server_id == IPv4Address("10.1.0.1")
    assert m.hostname == "node17"
    assert decode_suboptions(m.relay_agent_info) == {
        1: b"eth0/1/3",
        2: bytes.fromhex("001122334455"),
    }
    assert classify_client(m) is Firmware.OTHER


def test_overload_and_concatenation_decode():
    m = decode(overloaded_packet())
    assert m.overload == 3
    assert 52 not in m.options
    # RFC 3396: options field, then file, then sname
    assert m.options[43] == b"A" * 255 + b"B" * 10 + b"C" * 5
    assert m.hostname == "from-file"
    assert m.domain_name == "example.org"
    assert m.sname == b"" and m.file == b""  # they carried options, not names


def test_repeated_option_concatenated_in_options_field():
    pkt = header() + COOKIE + opt(53, b"\x01") + opt(77, b"\x04iP") + opt(77, b"XE") + b"\xff"
    m = decode(pkt)
    assert m.options[77] == b"\x04iPXE"
    assert m.user_class == [b"iPXE"]


def test_plain_bootp_without_options():
    m = decode(header())
    assert m.options == {} and m.message_type is None
    m = decode(header() + bytes(64))  # RFC 951 all-zero vendor area
    assert m.options == {}


def test_missing_end_is_tolerated_and_data_after_end_ignored():
    pkt = header() + COOKIE + opt(53, b"\x01")
    assert decode(pkt).message_type is MessageType.DISCOVER
    assert decode(pkt + b"\xff\x01\x02garbage").options == {53: b"\x01"}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter"),
        (header()[:235], "shorter"),
        (b"\x03" + header()[1:] + COOKIE, "op"),
        (header()[:2] + b"\x11" + header()[3:] + COOKIE, "hlen"),
        (header() + b"\x63\x82\x53", "cookie"),
        (header() + b"\x63\x82\x53\x64", "cookie"),
        (header() + COOKIE + b"\x35", "truncated"),
        (header() + COOKIE + b"\x35\x05\x01", "overruns"),
        (header() + COOKIE + opt(52, b"\x04") + b"\xff", "overload"),
        (header() + COOKIE + opt(52, b"\x01\x01") + b"\xff", "overload"),
    ],
)
def test_malformed(data, reason):
    with pytest.raises(MalformedPacket, match=reason):
        decode(data)


def test_malformed_option_in_overloaded_file():
    pkt = header(file=b"\x0c\xf0abc") + COOKIE + opt(52, b"\x01") + b"\xff"
    with pytest.raises(MalformedPacket):
        decode(pkt)


def test_non_bytes_input():
    with pytest.raises(MalformedPacket):
        decode("not bytes")  # type: ignore[arg-type]
    assert decode(bytearray(ipxe_discover_packet())).xid == 0x1A2B3C4D
    assert decode(memoryview(ipxe_discover_packet())).xid == 0x1A2B3C4D


@pytest.mark.parametrize(
    ("code", "value", "attr"),
    [
        (53, b"", "message_type"),
        (50, b"\x01\x02\x03", "requested_ip"),
        (51, b"\x01", "lease_time"),
        (93, b"\x00", "client_arch"),
        (94, b"\x01\x02", "client_ndi"),
        (97, b"\x00" * 5, "client_guid"),
        (3, b"\x01\x02\x03\x04\x05", "routers"),
        (57, b"\x05", "max_message_size"),
        (43, b"\x47\x03\x00\x00\x00", "pxe_vendor"),
        (43, b"\x08\x04\x80\x00\x02\x0a", "pxe_vendor"),
        (175, b"\x13\x05\x01", "ipxe_options"),
    ],
)
def test_malformed_option_values_raise_malformed(code, value, attr):
    m = DhcpMessage(options={code: value})
    with pytest.raises(MalformedPacket):
        getattr(m, attr)


def test_unknown_message_type_kept_as_int():
    assert DhcpMessage(options={53: b"\xc8"}).message_type == 200


# --------------------------------------------------------------------------- encoding


def test_typed_setters_round_trip():
    m = DhcpMessage(op=BOOTREPLY, xid=7, chaddr=MAC)
    m.message_type = MessageType.ACK
    m.server_id = "10.0.0.1"
    m.requested_ip = IPv4Address("10.0.0.9")
    m.lease_time = 86400
    m.renewal_time = 43200
    m.rebinding_time = 75600
    m.subnet_mask = "255.255.255.0"
    m.routers = ["10.0.0.254"]
    m.dns_servers = ["10.0.0.2", "10.0.0.3"]
    m.domain_name = "testbed.example"
    m.broadcast_address = "10.0.0.255"
    m.hostname = "pc42"
    m.tftp_server_name = "10.0.0.1"
    m.bootfile_name = "undionly.kpxe"
    m.vendor_class = "PXEClient"
    m.client_id = b"\x01" + MAC
    m.client_arch = [7, 9]
    m.client_ndi = (1, 3, 0)
    m.client_guid = GUID
    m.user_class = [b"iPXE", b"lab"]
    m.parameter_request_list = [1, 3, 6]
    m.max_message_size = 1472
    m.message = "nope"
    m.broadcast = True
    d = decode(encode(m, max_message_size=1500))
    assert d == m
    assert d.server_id == IPv4Address("10.0.0.1")
    assert d.lease_time == 86400 and d.renewal_time == 43200 and d.rebinding_time == 75600
    assert d.subnet_mask == IPv4Address("255.255.255.0")
    assert d.routers == [IPv4Address("10.0.0.254")]
    assert d.dns_servers == [IPv4Address("10.0.0.2"), IPv4Address("10.0.0.3")]
    assert d.domain_name == "testbed.example" and d.hostname == "pc42"
    assert d.broadcast_address == IPv4Address("10.0.0.255")
    assert d.tftp_server_name == "10.0.0.1" and d.bootfile_name == "undionly.kpxe"
    assert d.client_arch == [7, 9] and d.client_ndi == (1, 3, 0) and d.client_guid == GUID
    assert d.options[77] == b"\x04iPXE\x03lab" and d.user_class == [b"iPXE", b"lab"]
    assert d.max_message_size == 1472 and d.message == "nope" and d.broadcast
    m.user_class = b"iPXE"  # raw, as iPXE sends it
    assert m.options[77] == b"iPXE"
    m.lease_time = None
    assert 51 not in m.options
    m.broadcast = False
    assert m.flags == 0


@pytest.mark.parametrize("fixture", ALL_FIXTURES)
def test_fixture_round_trip(fixture):
    m = decode(fixture())
    again = decode(encode(m, max_message_size=1500))
    assert again == m
    assert again.options == m.options


def test_ipxe_discover_reencodes_byte_exact():
    pkt = ipxe_discover_packet()
    assert len(pkt) > 300
    assert encode(decode(pkt)) == pkt


def test_bootp_minimum_length_padding():
    out = encode(DhcpMessage(options={53: b"\x01"}))
    assert len(out) == 300 and out[240:244] == b"\x35\x01\x01\xff" and not any(out[244:])


def test_long_option_split_on_encode():
    val = bytes(range(256)) * 2 + b"xyz"  # 515 bytes
    out = encode(DhcpMessage(options={53: b"\x01", 224: val}), max_message_size=1500)
    chunks = tlvs(out)
    assert [(c, len(v)) for c, v in chunks] == [(53, 1), (224, 255), (224, 255), (224, 5)]
    assert decode(out).options[224] == val


def _offer_request() -> DhcpMessage:
    return decode(ipxe_discover_packet())


def test_make_reply_and_prl_ordering():
    req = decode(relayed_request_packet())
    reply = make_reply(
        req,
        MessageType.ACK,
        yiaddr="10.1.2.30",
        siaddr="10.1.0.1",
        server_id="10.1.0.1",
        file=b"pxelinux.0",
        options={
            51: (3600).to_bytes(4, "big"),  # mandatory, requested
            60: b"PXEClient",  # not requested, mandatory
            250: b"unrequested",  # neither
            6: bytes([10, 1, 0, 2]),
            1: bytes([255, 255, 255, 0]),
            3: bytes([10, 1, 2, 1]),
        },
    )
    assert reply.op == BOOTREPLY and reply.xid == req.xid and reply.hops == 0
    assert reply.ciaddr == req.ciaddr  # ACK copies ciaddr
    assert reply.giaddr == req.giaddr and reply.chaddr == req.chaddr and reply.flags == req.flags
    out = encode_reply(reply, req)
    codes = [c for c, _ in tlvs(out)]
    # 53, 54 first; then PRL order (1, 3, 6, 15, 28, 51, 58, 59); then the rest; 82 last
    assert codes == [53, 54, 1, 3, 6, 51, 60, 250, 82]
    assert dict(tlvs(out))[82] == req.options[82]  # echoed verbatim
    d = decode(out)
    assert d.file == b"pxelinux.0" and d.ip("yiaddr") == IPv4Address("10.1.2.30")
    assert make_reply(req, MessageType.OFFER).ciaddr == b"\0\0\0\0"


def test_offer_for_ipxe_with_pxe_and_ipxe_options():
    req = _offer_request()
    vend = encode_pxe_vendor(discovery_control=8, bootinfo_server="10.0.0.3")
    reply = make_reply(
        req,
        MessageType.OFFER,
        yiaddr=bytes([10, 0, 0, 50]),
        siaddr="10.0.0.1",
        server_id="10.0.0.1",
        file=b"http://10.0.0.1/boot.ipxe",
        options={
            51: b"\x00\x00\x0e\x10",
            1: b"\xff\xff\xff\x00",
            3: b"\x0a\x00\x00\x01",
            60: b"PXEClient",
            43: vend,
            175: encode_ipxe_encap(),
        },
    )
    out = encode_reply(reply, req)
    got = tlvs(out)
    codes = [c for c, _ in got]
    assert codes[:2] == [53, 54]
    # requested ones in the client's order: 1, 3, 43, 60, 175 ...
    assert codes[2:] == [1, 3, 43, 60, 175, 51]
    assert dict(got)[175] == b"\xb0\x01\x01"
    assert dict(got)[43] == b"\x06\x01\x08\x80\x04\x0a\x00\x00\x03\xff"


def test_pxe_vendor_suboptions_bytes_and_round_trip():
    raw = encode_pxe_vendor(
        discovery_control=7,
        boot_servers=[(0x8000, ["10.0.0.1", "10.0.0.2"])],
        boot_menu=[(0x8000, "Boot from network"), (0, b"Local disk")],
        menu_prompt=(5, "Press F8"),
        boot_item=(0x8000, 0),
        bootinfo_server="10.0.0.3",
        other={200: b"xx"},
    )
    expect = (
        opt(6, b"\x07")
        + opt(8, b"\x80\x00\x02" + bytes([10, 0, 0, 1, 10, 0, 0, 2]))
        + opt(9, b"\x80\x00\x11Boot from network" + b"\x00\x00\x0aLocal disk")
        + opt(10, b"\x05Press F8")
        + opt(71, b"\x80\x00\x00\x00")
        + opt(128, bytes([10, 0, 0, 3]))
        + opt(200, b"xx")
        + b"\xff"
    )
    assert raw == expect
    v = decode_pxe_vendor(raw)
    assert v.discovery_control == 7
    assert v.boot_servers == [
        PxeBootServer(0x8000, [IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")])
    ]
    assert v.boot_menu == [
        PxeBootMenuItem(0x8000, b"Boot from network"),
        PxeBootMenuItem(0, b"Local disk"),
    ]
    assert v.menu_prompt == (5, b"Press F8")
    assert v.boot_item == (0x8000, 0)
    assert v.bootinfo_server == IPv4Address("10.0.0.3")
    assert v.other == {200: b"xx"}
    assert DhcpMessage(options={43: raw}).pxe_vendor == v


def test_user_class_forms():
    assert decode_user_class(b"iPXE") == [b"iPXE"]
    assert decode_user_class(b"\x04iPXE\x03abc") == [b"iPXE", b"abc"]
    assert decode_user_class(b"") == []
    assert encode_user_class([b"iPXE", b"abc"]) == b"\x04iPXE\x03abc"
    assert encode_user_class(b"iPXE", rfc3004=False) == b"iPXE"


def _big_reply(file: bytes = b"", sname: bytes = b"") -> tuple[DhcpMessage, DhcpMessage]:
    req = DhcpMessage(chaddr=MAC, options={53: b"\x01", 55: bytes([1, 3, 6, 15, 43, 67])})
    opts = {
        51: b"\x00\x00\x0e\x10",
        1: b"\xff\xff\xff\x00",
        3: b"\x0a\x00\x00\x01",
        6: b"\x0a\x00\x00\x02" * 20,  # 80 bytes
        15: b"d" * 120,
        43: b"\x80\x04\x0a\x00\x00\x03" + b"\x0c" * 100,
        67: b"f" * 60,
        200: b"u" * 50,  # unrequested, not mandatory
    }
    return req, make_reply(req, 2, server_id="10.0.0.1", file=file, sname=sname, options=opts)


def test_overflow_into_file_and_sname_only_when_needed():
    req, reply = _big_reply()
    # plenty of room -> no overload
    out = encode(reply, prl=req.options[55], max_message_size=1500)
    assert 52 not in dict(tlvs(out)) and not any(out[44:236])
    # default 576 -> must use file/sname, stay within 548 bytes, keep everything
    out = encode_reply(reply, req)
    assert len(out) <= 548
    d = decode(out)
    assert d.overload in (1, 3)
    assert d.options == reply.options
    assert d.file == b"" and d.server_name == b""


def test_overflow_with_file_in_use_uses_sname_then_drops_unrequested():
    req, reply = _big_reply(file=b"pxelinux.0")
    out = encode_reply(reply, req)
    assert len(out) <= 548
    d = decode(out)
    assert d.boot_file == b"pxelinux.0"
    assert d.overload in (0, 2)
    assert 200 not in d.options  # dropped first
    for code in (53, 54, 51, 1, 3, 43, 67):
        assert d.options[code] == reply.options[code]


def test_mandatory_too_large_raises():
    req = DhcpMessage(options={53: b"\x01"})
    reply = make_reply(req, 2, sname=b"s", file=b"f", options={43: b"x" * 400})
    with pytest.raises(EncodeError):
        encode_reply(reply, req)
    assert decode(encode(reply, max_message_size=1500)).options[43] == b"x" * 400


def test_max_message_size_below_576_treated_as_576():
    _req, reply = _big_reply()
    assert encode(reply, max_message_size=300) == encode(reply)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: setattr(m, "file", b"x" * 129),
        lambda m: setattr(m, "sname", b"x" * 65),
        lambda m: setattr(m, "chaddr", b"x" * 17),
        lambda m: setattr(m, "xid", 1 << 32),
        lambda m: setattr(m, "ciaddr", "10.0.0.1"),
        lambda m: m.options.__setitem__(52, b"\x01"),
        lambda m: m.options.__setitem__(0, b""),
        lambda m: m.options.__setitem__(255, b""),
        lambda m: m.options.__setitem__(60, "str"),
        lambda m: m.options.__setitem__("x", b""),
    ],
)
def test_encode_errors(mutate):
    m = DhcpMessage(options={53: b"\x01"})
    mutate(m)
    with pytest.raises(EncodeError):
        encode(m)


def test_intenum_option_keys():
    from bootherd.dhcp.options import Opt

    m = DhcpMessage(options={Opt.MESSAGE_TYPE: b"\x02", Opt.LEASE_TIME: b"\0\0\0\x3c"})
    assert decode(encode(m, prl=[Opt.LEASE_TIME])).lease_time == 60


def test_encode_ipxe_encap():
    assert encode_ipxe_encap() == b"\xb0\x01\x01"
    assert encode_ipxe_encap({1: b"\x7f"}) == b"\xb0\x01\x01\x01\x01\x7f"
    assert encode_ipxe_encap(no_pxedhcp=False) == b""


def test_header_layout_matches_struct():
    m = DhcpMessage(
        op=BOOTREPLY, xid=0xDEADBEEF, secs=3, flags=0x8000, hops=2, yiaddr="1.2.3.4",
        chaddr=MAC, sname=b"srv", file=b"boot",
    )  # fmt: skip
    out = encode(m)
    assert out[:4] == b"\x02\x01\x06\x02"
    assert struct.unpack("!IHH", out[4:12]) == (0xDEADBEEF, 3, 0x8000)
    assert out[16:20] == b"\x01\x02\x03\x04"
    assert out[28:44] == MAC + bytes(10)
    assert out[44:108] == b"srv" + bytes(61)
    assert out[108:236] == b"boot" + bytes(124)
    assert out[236:240] == COOKIE
