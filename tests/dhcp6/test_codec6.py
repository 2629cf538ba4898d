"""The DHCPv6 codec: known messages, round trips, and fuzzing (bytes never crash it, nor
the engine)."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from bootherd.dhcp6 import codec
from bootherd.dhcp6.codec import IaAddr, IaNa, MalformedPacket, Message, MsgType, Opt
from bootherd.firmware import Firmware

# A SOLICIT as OVMF's PXE over IPv6 sends it (DUID-UUID, IA_NA, ORO 59..., arch 7).
OVMF_SOLICIT = codec.encode(Message(MsgType.SOLICIT, 0x123456, [
    (Opt.CLIENTID, b"\x00\x04" + bytes(16)),
    (Opt.IA_NA, codec.encode_ia_na(IaNa(0x77, 0, 0))),
    (Opt.ORO, b"\x00\x3b\x00\x3c\x00\x17\x00\x18"),
    (Opt.ELAPSED_TIME, b"\x00\x00"),
    (Opt.CLIENT_ARCH, b"\x00\x07"),
    (Opt.CLIENT_NII, b"\x01\x03\x00"),
    (Opt.VENDOR_CLASS, codec.encode_vendor_class(343, [b"PXEClient:Arch:00007:UNDI:003000"])),
]))


def test_decode_known_solicit():
    m = codec.decode(OVMF_SOLICIT)
    assert m.msg_type == MsgType.SOLICIT and m.xid == 0x123456
    assert codec.decode_ia_na(m.get(Opt.IA_NA)).iaid == 0x77
    assert codec.classify_client(m) is Firmware.UEFI_X64
    assert codec.encode(m) == OVMF_SOLICIT


def test_classifier():
    def msg(*opts):
        return Message(MsgType.SOLICIT, 1, list(opts))
    vc = codec.encode_vendor_class
    assert codec.classify_client(msg()) is Firmware.OTHER
    assert codec.classify_client(msg((Opt.VENDOR_CLASS, vc(343, [b"HTTPClient:Arch:00019"])))) \
        is Firmware.UEFI_HTTP_ARM64
    assert codec.classify_client(msg((Opt.VENDOR_CLASS, vc(343, [b"PXEClient"])),
                                     (Opt.CLIENT_ARCH, b"\x00\x0b"))) is Firmware.UEFI_ARM64
    assert codec.classify_client(msg((Opt.USER_CLASS, codec.opaque_list([b"iPXE"])))) \
        is Firmware.IPXE
    assert codec.classify_client(msg((Opt.VENDOR_CLASS, b"\x00"))) is Firmware.OTHER  # bad


def test_client_identity():
    mac = bytes.fromhex("525400770001")
    assert codec.duid_mac(b"\x00\x03\x00\x01" + mac) == mac
    assert codec.duid_mac(b"\x00\x01\x00\x01abcd" + mac) == mac
    assert codec.duid_mac(b"\x00\x04" + bytes(16)) is None
    assert codec.eui64_mac("fe80::5054:ff:fe77:1%vs0") == mac
    assert codec.eui64_mac("fe80::1") is None and codec.eui64_mac("junk") is None


def test_relay_round_trip_and_hop_limit():
    inner = OVMF_SOLICIT
    relay = Message(MsgType.RELAY_FORW, 0, [(Opt.RELAY_MSG, inner)], 3,
                    ipaddress.IPv6Address("2001:db8::1").packed, bytes(16))
    assert codec.decode(codec.encode(relay)) == relay


@given(st.binary(max_size=600))
@settings(max_examples=3000, deadline=None)
def test_decode_never_raises_anything_else(data: bytes) -> None:
    try:
        m = codec.decode(data)
    except MalformedPacket:
        return
    assert codec.encode(m) == data  # a decodable message encodes back to its bytes
    for _code, value in m.options:
        for parse in (codec.decode_ia_na, codec.decode_iaaddr, codec.decode_status,
                      codec.vendor_class):
            try:
                parse(value)
            except MalformedPacket:
                pass
    codec.classify_client(m)
    codec.client_mac(m, "fe80::1")


options = st.lists(st.tuples(st.sampled_from([1, 2, 3, 5, 6, 8, 13, 14, 15, 16, 59, 61, 79, 9]),
                             st.binary(max_size=40)), max_size=8)


@given(st.integers(1, 13), st.integers(0, (1 << 24) - 1), options, st.binary(max_size=20))
@settings(max_examples=1500, deadline=None)
def test_the_engine_never_raises_on_mutated_messages(mt, xid, opts, tail):
    """Structurally valid headers with random option payloads (IA_NA, DUIDs, relay
    messages, vendor classes): handle() answers or drops, never raises."""
    from test_engine6 import SNAP, Given, make_engine

    engine = make_engine(Given(pool=True))
    ia = codec.encode_ia_na(IaNa(1, 0, 0, [(Opt.IAADDR, codec.encode_iaaddr(
        IaAddr(ipaddress.IPv6Address("fd77::1003").packed, 0, 0)))]))
    data = codec.encode(Message(mt, xid, [(Opt.CLIENTID, b"\x00\x03\x00\x01" + bytes(6)),
                                          (Opt.IA_NA, ia), *opts])) + tail
    engine.handle(data, "fe80::5054:ff:fe77:1", 546, 1e6, SNAP)
    engine.handle(data[:len(data) // 2], "fe80::5054:ff:fe77:1", 546, 1e6, SNAP)
