"""Cross-check bootherd.dhcp.codec with scapy as an independent decoder."""

from __future__ import annotations

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from test_codec import (
    GUID,
    MAC,
    http_discover_packet,
    ipxe_discover_packet,
    ovmf_discover_packet,
    relayed_request_packet,
)

from bootherd.dhcp.codec import (
    DhcpMessage,
    MessageType,
    decode,
    encode,
    encode_ipxe_encap,
    encode_pxe_vendor,
    encode_reply,
    make_reply,
)
from bootherd.dhcp.options import decode_suboptions


def scapy_options(pkt: bytes) -> tuple[object, dict[object, object], list[object]]:
    p = BOOTP(pkt)
    opts = [o for o in p[DHCP].options if isinstance(o, tuple)]
    return p, {o[0]: (o[1] if len(o) == 2 else o[1:]) for o in opts}, [o[0] for o in opts]


def _pxe_ack() -> tuple[DhcpMessage, bytes]:
    req = decode(relayed_request_packet())
    reply = make_reply(
        req,
        MessageType.ACK,
        yiaddr="10.1.2.30",
        siaddr="10.1.0.1",
        server_id="10.1.0.1",
        file=b"undionly.kpxe",
        sname=b"boothost",
        options={
            51: (3600).to_bytes(4, "big"),
            58: (1800).to_bytes(4, "big"),
            59: (3150).to_bytes(4, "big"),
            1: bytes([255, 255, 255, 0]),
            3: bytes([10, 1, 2, 1, 10, 1, 2, 2]),
            6: bytes([10, 1, 0, 2]),
            15: b"example.org",
            28: bytes([10, 1, 2, 255]),
            12: b"node17",
            66: b"10.1.0.1",
            67: b"undionly.kpxe",
            60: b"PXEClient",
            43: encode_pxe_vendor(
                discovery_control=8,
                boot_servers=[(0x8000, ["10.1.0.1"])],
                boot_menu=[(0x8000, "bootherd")],
                menu_prompt=(0, "bootherd"),
                bootinfo_server="10.1.0.3",
            ),
            175: encode_ipxe_encap(),
        },
    )
    reply.broadcast = True
    return req, encode_reply(reply, req)


def test_ack_fields_and_options_seen_by_scapy():
    req, out = _pxe_ack()
    p, o, order = scapy_options(out)
    assert p.op == 2 and p.htype == 1 and p.hlen == 6 and p.hops == 0
    assert p.xid == req.xid
    assert int(p.flags) == 0x8000
    assert p.ciaddr == "10.1.2.30" and p.yiaddr == "10.1.2.30"
    assert p.siaddr == "10.1.0.1" and p.giaddr == "10.1.2.1"
    assert bytes(p.chaddr)[:6] == MAC
    assert bytes(p.sname).rstrip(b"\0") == b"boothost"
    assert bytes(p.file).rstrip(b"\0") == b"undionly.kpxe"
    assert o["message-type"] == 5
    assert o["server_id"] == "10.1.0.1"
    assert o["lease_time"] == 3600 and o["renewal_time"] == 1800 and o["rebinding_time"] == 3150
    assert o["subnet_mask"] == "255.255.255.0"
    assert o["router"] == ("10.1.2.1", "10.1.2.2")
    assert o["broadcast_address"] == "10.1.2.255"
    assert o["domain"] == b"example.org"
    assert o["tftp_server_name"] == b"10.1.0.1"
    assert o["boot-file-name"] == b"undionly.kpxe"
    assert o["vendor_class_id"] == b"PXEClient"
    assert o[175] == b"\xb0\x01\x01"
    assert o["relay_agent_information"] == req.options[82]
    # PXE sub-options, walked independently of our decoder
    vs = o["vendor_specific"]
    assert vs[:3] == b"\x06\x01\x08"
    assert b"\x08\x07\x80\x00\x01\x0a\x01\x00\x01" in vs  # boot server type 0x8000 -> 10.1.0.1
    assert b"\x09\x0b\x80\x00\x08bootherd" in vs
    assert b"\x0a\x09\x00bootherd" in vs
    assert b"\x80\x04\x0a\x01\x00\x03" in vs and vs.endswith(b"\xff")
    # 53, 54 first, then the client's PRL order (1, 3, 6, 15, 28, 51, 58, 59), 82 last
    assert order[:10] == [
        "message-type", "server_id", "subnet_mask", "router", "name_server", "domain",
        "broadcast_address", "lease_time", "renewal_time", "rebinding_time",
    ]  # fmt: skip
    assert order[-1] == "relay_agent_information"


@pytest.mark.parametrize(
    "packet", [ipxe_discover_packet, ovmf_discover_packet, http_discover_packet]
)
def test_fixture_decoding_agrees_with_scapy(packet):
    raw = packet()
    m = decode(raw)
    p, o, _ = scapy_options(raw)
    assert (p.op, p.xid, p.secs, int(p.flags)) == (m.op, m.xid, m.secs, m.flags)
    assert bytes(p.chaddr)[: p.hlen] == m.mac
    assert o["message-type"] == int(m.message_type)
    assert o["vendor_class_id"] == m.vendor_class
    assert o["pxe_client_architecture"] == m.options[93]
    assert o["pxe_client_network_interface"] == bytes(m.client_ndi)
    assert o["pxe_client_machine_identifier"] == b"\x00" + GUID == b"\x00" + m.client_guid
    assert o["param_req_list"] == m.parameter_request_list
    assert o["max_dhcp_size"] == m.max_message_size
    if 175 in o:
        assert decode_suboptions(o[175]) == m.ipxe_options
        assert o["user_class"] == b"iPXE"


def test_scapy_built_packet_decodes():
    pkt = bytes(
        BOOTP(op=1, xid=0x42, chaddr=MAC + bytes(10), flags=0x8000)
        / DHCP(
            options=[
                ("message-type", "request"),
                ("requested_addr", "10.0.0.7"),
                ("server_id", "10.0.0.1"),
                ("hostname", b"pc7"),
                ("vendor_class_id", b"PXEClient:Arch:00007:UNDI:003000"),
                ("pxe_client_architecture", b"\x00\x07"),
                "end",
            ]
        )
    )
    m = decode(pkt)
    assert m.message_type is MessageType.REQUEST and m.broadcast and m.xid == 0x42
    assert str(m.requested_ip) == "10.0.0.7" and str(m.server_id) == "10.0.0.1"
    assert m.hostname == "pc7" and m.client_arch == [7]


def test_long_option_split_visible_to_scapy():
    out = encode(DhcpMessage(options={53: b"\x01", 43: b"z" * 300}), max_message_size=1500)
    _, _, order = scapy_options(out)
    assert order == ["message-type", "vendor_specific", "vendor_specific"]
