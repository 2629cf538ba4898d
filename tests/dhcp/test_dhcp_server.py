"""The DHCP service in-process on loopback: DORA, PXE/HTTP/iPXE boot files, relays,
RFC 2131 NAK rules, RELEASE/DECLINE/INFORM/BOOTP, leases in the table, malformed input."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from bootherd import udpsend
from bootherd.config import build
from bootherd.dhcp.codec import DhcpMessage, decode, encode
from bootherd.dhcp.options import decode_pxe_vendor, decode_suboptions
from bootherd.dhcp.service import DhcpService
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.lifecycle import Lifecycle
from bootherd.metrics import Metrics
from bootherd.service import Context

SUBNET = "127.21.0.0/24"
SERVER = "127.0.0.1"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sk:
        sk.bind((SERVER, 0))
        return sk.getsockname()[1]


class Env:
    def __init__(self, svc: Any, live: LiveInventory, port: int, engine: Any):
        self.svc = svc
        self.live = live
        self.port = port
        self.db = engine
        self.counters = svc.counters
        snap = live.snapshot
        self.nodes = sorted(snap.nodes.values(), key=lambda n: int(n.node_id[2:]))

    def mac(self, i: int) -> bytes:
        return bytes.fromhex(self.nodes[i].control_mac.replace(":", ""))

    def ip(self, i: int) -> str:
        return self.nodes[i].control_ip

    async def lease_rows(self) -> list[Any]:
        await self.svc.server.flushed()  # an inventory node's ACK goes before its row
        with self.db.connect() as c:
            return list(c.execute(select(s.leases)))


async def start_env(tmp_path: Any, log_requests_on: bool = False, **dhcp: Any) -> tuple[Env, Any]:
    db = make_engine(f"sqlite:///{tmp_path}/i.db")
    upgrade(db)
    if not (tmp_path / "imported").exists():
        import_testbed(db, generate(12, subnet=SUBNET))
        (tmp_path / "imported").write_text("")
    port = free_udp_port()
    cfg = build({
        "server": {"public_address": SERVER},
        "dhcp": {"address": SERVER, "port": port, "proxy_port": free_udp_port(), **dhcp},
        "http": {"port": 8080},
        "log": {"requests": ["dhcp"] if log_requests_on else []},
    })
    live = LiveInventory(db, 0.05, 0.01)
    await live.start()
    ctx = Context(cfg, live, Metrics(), server_name="t")
    svc = DhcpService(ctx, Lifecycle(cfg, live, ctx.metrics, "t"))
    await svc.start()
    return Env(svc, live, port, db), ctx


@pytest.fixture(params=["native-send", "loop-send"])
async def env(request: Any, tmp_path: Any) -> AsyncIterator[Env]:
    # Every exchange runs with replies sent by the native thread and by the event loop.
    e, _ = await start_env(tmp_path, native_send=request.param == "native-send",
                           unknown_clients="pool",
                           dynamic_pool="127.21.1.10-127.21.1.250",
                           routers=["127.21.0.1"], domain="example.org",
                           client_port=free_udp_port())
    try:
        yield e
    finally:
        await e.svc.stop()
        await e.live.stop()


class Client:
    """A DHCP client speaking from a loopback address (replies come back to its source)."""

    def __init__(self, src: str = "127.21.0.200", port: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((src, port))
        self.sock.setblocking(False)

    def close(self) -> None:
        self.sock.close()

    async def ask(self, server_port: int, pkt: bytes, timeout: float = 2.0,
                  server: str = SERVER) -> DhcpMessage | None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(self.sock, pkt, (server, server_port))
        try:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 2048), timeout)
        except TimeoutError:
            return None
        return decode(data)


def request(mac: bytes, mtype: int | None, *, xid: int = 0x1234, opts: dict[int, bytes] | None = None,
            ciaddr: str = "0.0.0.0", giaddr: str = "0.0.0.0", flags: int = 0) -> bytes:
    o: dict[int, bytes] = {}
    if mtype is not None:
        o[53] = bytes([mtype])
    o.update(opts or {})
    return encode(DhcpMessage(1, xid=xid, chaddr=mac, ciaddr=ciaddr, giaddr=giaddr, flags=flags,
                              options=o))


PXE_BIOS = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\x00\x00"}
PXE_UEFI = {60: b"PXEClient:Arch:00007:UNDI:003000", 93: b"\x00\x07"}
HTTP_UEFI = {60: b"HTTPClient:Arch:00016:UNDI:003001", 93: b"\x00\x10"}
IPXE = {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\x00\x00", 77: b"iPXE",
        175: b"\x13\x01\x01"}
SID = {54: socket.inet_aton(SERVER)}


async def dora(env: Env, c: Client, mac: bytes, opts: dict[int, bytes]) -> tuple[DhcpMessage, DhcpMessage]:
    offer = await c.ask(env.port, request(mac, 1, opts=opts))
    assert offer is not None and offer.message_type == 2
    ack = await c.ask(env.port, request(mac, 3, opts={**opts, **SID, 50: offer.yiaddr}))
    assert ack is not None and ack.message_type == 5
    return offer, ack


async def test_known_node_pxe_bios_dora(env: Env) -> None:
    c = Client()
    try:
        offer, ack = await dora(env, c, env.mac(0), PXE_BIOS)
    finally:
        c.close()
    for m in (offer, ack):
        assert m.ip("yiaddr").compressed == env.ip(0)
        assert m.boot_file == b"undionly.kpxe"
        assert m.ip("siaddr").compressed == SERVER
        assert m.options[60] == b"PXEClient"
        pxe = decode_pxe_vendor(m.options[43])
        assert pxe.discovery_control == 8
        assert str(pxe.bootinfo_server) == SERVER
        assert m.subnet_mask.compressed == "255.255.255.0"
        assert m.hostname == env.nodes[0].node_id
        assert m.server_id.compressed == SERVER
    assert ack.lease_time == 86400
    assert (env.svc.server.sender is None) == (not env.svc.server.native_send
                                                or not udpsend.available)
    rows = {r.ip: r for r in await env.lease_rows()}
    assert rows[env.ip(0)].mac == env.nodes[0].control_mac
    assert rows[env.ip(0)].state == "bound"
    assert rows[env.ip(0)].node_id == env.nodes[0].node_id
    await asyncio.sleep(0)
    assert env.live.state_of(env.nodes[0].node_id)[0] == "PXEBOOTING"


@pytest.mark.parametrize("opts,file_check,vc", [
    (PXE_UEFI, lambda f: f == b"snponly.efi", b"PXEClient"),
    (HTTP_UEFI, lambda f: f.startswith(b"http://127.0.0.1:8080/") and f.endswith(b"ipxe.efi"),
     b"HTTPClient"),
    (IPXE, lambda f: f.startswith(b"http://127.0.0.1:8080/ipxe"), b"PXEClient"),
])
async def test_firmware_boot_files(env: Env, opts: dict[int, bytes], file_check: Any,
                                   vc: bytes) -> None:
    c = Client()
    try:
        offer, ack = await dora(env, c, env.mac(1), opts)
    finally:
        c.close()
    for m in (offer, ack):
        assert file_check(m.boot_file or m.options.get(67, b"")), m.boot_file
        assert m.options[60] == vc
    if 77 in opts:
        assert decode_suboptions(ack.options[175])[176] == b"\x01"
    else:
        assert 175 not in ack.options


async def test_unknown_client_pool_and_sticky(env: Env) -> None:
    mac = bytes.fromhex("0a0000000001")
    c = Client()
    try:
        offer, ack = await dora(env, c, mac, PXE_BIOS)
        assert ack.ip("yiaddr").compressed.startswith("127.21.1.")
        assert ack.lease_time == 600
        # INIT-REBOOT with the same address: ACK again; RENEWING via ciaddr: ACK.
        ack2 = await c.ask(env.port, request(mac, 3, opts={50: ack.yiaddr}))
        assert ack2 is not None and ack2.message_type == 5 and ack2.yiaddr == ack.yiaddr
        # A second, different client gets another address.
        o2, a2 = await dora(env, c, bytes.fromhex("0a0000000002"), {})
        assert a2.yiaddr != ack.yiaddr
        # The same MAC rediscovering gets its address back.
        o3 = await c.ask(env.port, request(mac, 1))
        assert o3 is not None and o3.yiaddr == ack.yiaddr
    finally:
        c.close()
    # Unknown nodes boot the new-node image path through policy (BIOS loader fallback).
    assert offer.boot_file


async def test_unknown_client_ignored(tmp_path: Any) -> None:
    e, _ = await start_env(tmp_path)
    c = Client()
    try:
        r = await c.ask(e.port, request(bytes.fromhex("0a0000000009"), 1, opts=PXE_BIOS), 0.3)
        assert r is None
        assert e.counters["ignored"] == 1
        # Known nodes are still served.
        offer = await c.ask(e.port, request(e.mac(2), 1))
        assert offer is not None and offer.ip("yiaddr").compressed == e.ip(2)
    finally:
        c.close()
        await e.svc.stop()
        await e.live.stop()


async def test_nak_rules(env: Env) -> None:
    c = Client()
    mac = env.mac(3)
    try:
        # INIT-REBOOT for a wrong address: NAK (broadcast bit semantics aside).
        r = await c.ask(env.port, request(mac, 3, opts={50: socket.inet_aton("10.9.9.9")}))
        assert r is not None and r.message_type == 6 and r.yiaddr == b"\0\0\0\0"
        # SELECTING with our server id but another address: NAK.
        r = await c.ask(env.port, request(mac, 3, opts={**SID, 50: socket.inet_aton("127.21.0.99")}))
        assert r is not None and r.message_type == 6
        # Another server's id: silence (never wedge PXE firmware).
        other = {54: socket.inet_aton("127.0.0.9"), 50: socket.inet_aton(env.ip(3))}
        r = await c.ask(env.port, request(mac, 3, opts=other), 0.3)
        assert r is None
        # RENEWING with the right ciaddr: ACK with ciaddr echoed, unicast to ciaddr.
        renewing = Client(env.ip(3), env.svc.settings.client_port)
        try:
            r = await renewing.ask(env.port, request(mac, 3, ciaddr=env.ip(3)))
        finally:
            renewing.close()
        assert r is not None and r.message_type == 5 and r.ip("ciaddr").compressed == env.ip(3)
        # Unknown client in INIT-REBOOT with no record: silence.
        r = await c.ask(env.port, request(bytes.fromhex("0a00000000aa"), 3,
                                          opts={50: socket.inet_aton("127.21.1.77")}), 0.3)
        assert r is None
    finally:
        c.close()
    assert env.counters["nak"] == 2


async def test_relay_reply_goes_to_giaddr_with_option_82(tmp_path: Any) -> None:
    relay = Client("127.21.0.254")
    relay_port = relay.sock.getsockname()[1]
    e, _ = await start_env(tmp_path, relay_port=relay_port)
    try:
        rai = b"\x01\x04abcd\x02\x02xy"
        offer = await relay.ask(e.port, request(e.mac(4), 1, giaddr="127.21.0.254",
                                                opts={82: rai, **PXE_BIOS}))
        assert offer is not None and offer.options[82] == rai
        assert offer.ip("giaddr").compressed == "127.21.0.254"
        assert offer.ip("yiaddr").compressed == e.ip(4)
    finally:
        relay.close()
        await e.svc.stop()
        await e.live.stop()


async def test_release_decline_inform_bootp(env: Env) -> None:
    c = Client()
    mac = bytes.fromhex("0a0000000077")
    try:
        _, ack = await dora(env, c, mac, {})
        ip = ack.ip("yiaddr").compressed
        # INFORM: ACK without yiaddr or lease time, to ciaddr.
        informer = Client(env.ip(5), env.svc.settings.client_port)
        try:
            inf = await informer.ask(env.port, request(env.mac(5), 8, ciaddr=env.ip(5)))
        finally:
            informer.close()
        assert inf is not None and inf.message_type == 5 and inf.yiaddr == b"\0\0\0\0"
        assert 51 not in inf.options
        # DECLINE: the address is marked declined and the client gets another one.
        await c.ask(env.port, request(mac, 4, opts={**SID, 50: ack.yiaddr}), 0.2)
        offer = await c.ask(env.port, request(mac, 1))
        assert offer is not None and offer.yiaddr != ack.yiaddr
        # RELEASE of the new lease.
        _, ack2 = await dora(env, c, mac, {})
        await c.ask(env.port, request(mac, 7, ciaddr=ack2.ip("yiaddr").compressed, opts=SID),
                    0.2)
        # BOOTP: a BOOTREPLY with address and boot file, no DHCP message type.
        bp = await c.ask(env.port, request(env.mac(6), None))
        assert bp is not None and bp.op == 2 and 53 not in bp.options
        assert bp.ip("yiaddr").compressed == env.ip(6) and bp.boot_file == b"undionly.kpxe"
    finally:
        c.close()
    await asyncio.sleep(0.1)
    rows = {r.ip: r for r in await env.lease_rows()}
    assert rows[ip].state == "declined"
    assert rows[ack2.ip("yiaddr").compressed].state == "released"
    assert rows[env.ip(6)].expires > 1e9 + 5 * 365 * 86400


async def test_malformed_counted_and_server_keeps_answering(env: Env) -> None:
    c = Client()
    try:
        loop = asyncio.get_running_loop()
        junk = [b"", b"\x01" * 10, b"\x01" + bytes(300),
                struct.pack("!B", 1) + bytes(235) + b"\x63\x82\x53\x63" + b"\x35\x05\x01",
                request(env.mac(0), 1)[:240] + b"\x35\x01\x01\x0c\x50ab"]
        for j in junk:
            await loop.sock_sendto(c.sock, j, (SERVER, env.port))
        offer = await c.ask(env.port, request(env.mac(7), 1))
        assert offer is not None and offer.ip("yiaddr").compressed == env.ip(7)
    finally:
        c.close()
    assert env.counters["malformed"] >= 3


async def test_proxy_mode(tmp_path: Any) -> None:
    e, ctx = await start_env(tmp_path, mode="proxy")
    c = Client()
    try:
        offer = await c.ask(e.port, request(e.mac(8), 1, opts=PXE_UEFI))
        assert offer is not None and offer.message_type == 2
        assert offer.yiaddr == b"\0\0\0\0" and offer.boot_file == b"snponly.efi"
        assert offer.options[60] == b"PXEClient" and 51 not in offer.options
        # A plain (non-PXE) client is left to the site's DHCP server.
        assert await c.ask(e.port, request(e.mac(8), 1), 0.3) is None
        # The boot-server REQUEST on the proxy port gets an ACK with the boot file.
        proxy_port = ctx.config.dhcp.proxy_port
        ack = await c.ask(proxy_port, request(e.mac(8), 3, ciaddr="127.21.0.200",
                                              opts=PXE_UEFI))
        assert ack is not None and ack.message_type == 5 and ack.boot_file == b"snponly.efi"
    finally:
        c.close()
        await e.svc.stop()
        await e.live.stop()


async def test_leases_survive_restart(tmp_path: Any) -> None:
    e, _ = await start_env(tmp_path, unknown_clients="pool", dynamic_pool="127.21.1.10-127.21.1.20")
    c = Client()
    got = {}
    try:
        for k in range(5):
            mac = bytes([10, 0, 0, 0, 1, k])
            _, ack = await dora(e, c, mac, {})
            got[mac] = ack.yiaddr
    finally:
        await e.svc.stop()
        await e.live.stop()
    e, _ = await start_env(tmp_path, unknown_clients="pool", dynamic_pool="127.21.1.10-127.21.1.20")
    try:
        for mac, ip in got.items():
            offer = await c.ask(e.port, request(mac, 1))
            assert offer is not None and offer.yiaddr == ip
    finally:
        c.close()
        await e.svc.stop()
        await e.live.stop()


async def test_inventory_ack_goes_before_its_lease_commit_pool_ack_waits(env: Env) -> None:
    """An inventory node's address is the inventory's: its ACK is sent while the lease
    commit is held up; a pool grant's ACK waits for its row, and both rows are written."""
    writer = env.svc.server.writer
    real_submit, held = writer.submit, []
    writer.submit = lambda batch, done: held.append((batch, done))  # the database stalls
    node, pool = Client(), Client("127.21.0.201")
    try:
        _, ack = await dora(env, node, env.mac(2), PXE_BIOS)
        assert ack.ip("yiaddr").compressed == env.ip(2)
        mac = bytes.fromhex("0a00000000aa")
        offer = await pool.ask(env.port, request(mac, 1, opts=PXE_BIOS))
        assert offer is not None and offer.message_type == 2
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(pool.sock, request(mac, 3, opts={**PXE_BIOS, **SID,
                                                                50: offer.yiaddr}),
                               (SERVER, env.port))
        with pytest.raises(TimeoutError):  # no ACK while its row is not committed
            await asyncio.wait_for(loop.sock_recv(pool.sock, 2048), 0.5)
        assert held
        writer.submit = real_submit
        for batch, done in held:
            real_submit(batch, done)
        pool_ack = decode(await asyncio.wait_for(loop.sock_recv(pool.sock, 2048), 5))
        assert pool_ack.message_type == 5 and pool_ack.yiaddr == offer.yiaddr
    finally:
        writer.submit = real_submit
        node.close()
        pool.close()
    rows = {r.ip: r for r in await env.lease_rows()}
    assert rows[env.ip(2)].node_id == env.nodes[2].node_id
    assert rows[offer.ip("yiaddr").compressed].mac == mac.hex(":")
