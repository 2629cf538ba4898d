"""What a DHCP reply advertises comes from the address its request arrived on (as
dnsmasq does) unless server.public_address / dhcp.address fix it: the server
identifier, siaddr, the boot server of option 43, the next-server and URLs the boot
file names.  Routers go only to the clients of their own subnet."""

from __future__ import annotations

import socket

from bootherd.config import build
from bootherd.dhcp.codec import DhcpMessage, decode, encode
from bootherd.dhcp.engine import Engine, Settings
from bootherd.inventory.memory import snapshot_from_text
from bootherd.inventory.testbed import generate

SNAP = snapshot_from_text(generate(4, subnet="10.252.0.0/16"))
PC1 = SNAP.nodes["pc1"]
MAC = bytes.fromhex(PC1.control_mac.replace(":", ""))
PXE = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\x00\x00"}


def engine(**sections: dict) -> tuple[Engine, list[str]]:
    cfg = build(sections)
    asked: list[str] = []

    def boot_file(snap, node, slot, server):  # noqa: ANN001, ANN202
        asked.append(server)
        return f"http://{server}:8080/boot/x.efi", server

    return Engine(Settings.from_config(cfg, "t"), boot_file), asked


def discover(e: Engine, local: str, mac: bytes = MAC) -> DhcpMessage:
    pkt = encode(DhcpMessage(1, xid=7, chaddr=mac, flags=0x8000, options={53: b"\x01", **PXE}))
    d = e.handle(pkt, "0.0.0.0", 68, 1e6, SNAP, local_ip=local)
    assert d is not None
    return decode(d.data)


def bootinfo_server(opt43: bytes) -> str:
    # PXE vendor options: Emulab's sub-option 128 carries the bootinfo server.
    i = 0
    while i < len(opt43) and opt43[i] != 255:
        code, n = opt43[i], opt43[i + 1]
        if code == 128:
            return socket.inet_ntoa(opt43[i + 2:i + 2 + n])
        i += 2 + n
    raise AssertionError(f"no boot server in {opt43!r}")


def test_wildcard_server_advertises_the_arrival_address() -> None:
    e, asked = engine(dhcp={"address": "0.0.0.0"}, server={"public_address": ""})
    for local in ("10.252.0.1", "10.253.0.1"):  # two interfaces, two answers
        r = discover(e, local)
        assert socket.inet_ntoa(r.siaddr) == local
        assert r.options[54] == socket.inet_aton(local)
        assert r.options[66] == local.encode()
        assert r.file.rstrip(b"\0") == f"http://{local}:8080/boot/x.efi".encode() \
            or r.options[67] == f"http://{local}:8080/boot/x.efi".encode()
        assert bootinfo_server(r.options[43]) == local
        assert b"127.0.0.1" not in encode_all(r)
    assert asked == ["10.252.0.1", "10.253.0.1"]
    assert discover(e, "10.252.0.1") and asked[-1] == "10.253.0.1"  # cached per address


def encode_all(msg: DhcpMessage) -> bytes:
    return msg.siaddr + b"".join(msg.options.values()) + msg.file


def test_public_address_wins_and_server_id_stays_the_arrival_address() -> None:
    e, asked = engine(dhcp={"address": "0.0.0.0"}, server={"public_address": "10.252.9.9"})
    r = discover(e, "10.252.0.1")
    assert socket.inet_ntoa(r.siaddr) == "10.252.9.9" and asked == ["10.252.9.9"]
    assert bootinfo_server(r.options[43]) == "10.252.9.9"
    assert r.options[54] == socket.inet_aton("10.252.0.1")  # what the client answers to


def test_unicast_bound_server_identifies_with_its_address() -> None:
    e, asked = engine(dhcp={"address": "10.252.0.1"}, server={"public_address": ""})
    r = discover(e, "10.252.0.1")
    assert r.options[54] == socket.inet_aton("10.252.0.1") and asked == ["10.252.0.1"]


def test_routers_go_only_to_their_subnet() -> None:
    e, _ = engine(dhcp={"address": "0.0.0.0", "routers": ["10.252.0.254", "10.9.0.1"]})
    r = discover(e, "10.252.0.1")
    assert r.options[3] == socket.inet_aton("10.252.0.254")
    e, _ = engine(dhcp={"address": "0.0.0.0", "routers": ["10.9.0.1"]})
    assert 3 not in discover(e, "10.252.0.1").options
