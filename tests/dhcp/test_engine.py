"""The DHCP engine's decisions, as a table: one request in a given state, one Decision out.

No sockets, no database, no clock: each row builds an Engine over an in-memory
snapshot (inventory.memory), primes its lease table, hands it one request and
compares the Decision (reply type, address, boot file, next-server, options,
destination, lease row to commit, node to mark PXEBOOTING).  The socket-level
smoke tests of the same engine are test_dhcp_server.py (loopback) and
test_dhcp_netns.py (real clients).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest

from bootherd.config import build
from bootherd.dhcp.codec import DhcpMessage, decode, encode
from bootherd.dhcp.engine import BOOTP_LEASE, DECLINE_HOLD, OFFER_HOLD, Decision, Engine, Settings
from bootherd.dhcp.leases import BOUND, DECLINED, OFFERED
from bootherd.inventory.memory import snapshot_from_text
from bootherd.inventory.testbed import generate
from bootherd.policy import dhcp_boot

SERVER = "10.77.0.1"
OTHER_SERVER = "10.77.0.254"
RELAY = "10.77.9.1"
POOL = "10.77.0.100-10.77.0.110"
NOW = 1_000_000.0
LEASE, DYN_LEASE = 86400, 600

SNAP = snapshot_from_text(generate(6, subnet="10.77.0.0/24"))
# The same testbed with arm64 loaders on every node type (loaders by architecture).
ARM64_FILE, ARM64_HTTP = b"arm64/grubnetaa64.efi", "arm64/grub-http.efi"
_text = generate(6, subnet="10.77.0.0/24")
_head, _sep, _tail = _text.partition("[[nodes]]")
SNAP_ARM64 = snapshot_from_text(_head.replace(
    'loader_ipxe = ""\n', 'loader_ipxe = ""\nloaders = { uefi-arm64 = "arm64/grubnetaa64.efi", '
    f'http-arm64 = "{ARM64_HTTP}" }}\n') + _sep + _tail)
SNAPS = {"plain": SNAP, "arm64": SNAP_ARM64}
PC1 = SNAP.nodes["pc1"]
PC1_IP = PC1.control_ip  # 10.77.0.2
MACS = {
    "pc1": bytes.fromhex(PC1.control_mac.replace(":", "")),
    "pc1.expt": bytes.fromhex(PC1.interfaces[1].mac.replace(":", "")),  # not its control MAC
    "stranger": bytes.fromhex("0a0b0c0d0e01"),
    "other": bytes.fromhex("0a0b0c0d0e02"),
}

FIRMWARE = {
    "bios": {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\x00\x00"},
    "uefi": {60: b"PXEClient:Arch:00007:UNDI:003000", 93: b"\x00\x07"},
    "arm64": {60: b"PXEClient:Arch:00011:UNDI:003000", 93: b"\x00\x0b"},
    "ia32": {60: b"PXEClient:Arch:00006:UNDI:003000", 93: b"\x00\x06"},  # no loader: refused
    "arch99": {60: b"PXEClient:Arch:00099:UNDI:003000", 93: b"\x00\x63"},  # not registered
    "http-arm64": {60: b"HTTPClient:Arch:00019:UNDI:003001", 93: b"\x00\x13"},
    "http": {60: b"HTTPClient:Arch:00016:UNDI:003001", 93: b"\x00\x10"},
    "ipxe": {60: b"PXEClient:Arch:00000:UNDI:002001", 93: b"\x00\x00", 77: b"iPXE",
             175: b"\x13\x01\x01"},
    "os": {},  # an operating system's DHCP client
}
BIOS_FILE, UEFI_FILE = b"undionly.kpxe", b"snponly.efi"
HTTP_FILE = f"http://{SERVER}:8080/boot/ipxe.efi".encode()
IPXE_FILE = f"http://{SERVER}:8080/ipxe?mac=${{netX/mac:hexhyp}}".encode()
OPT82 = b"\x01\x04port\x02\x03sw1"
BCAST = ("255.255.255.255", 68, True)
VIA_RELAY = (RELAY, 67, False)


@dataclass(frozen=True)
class Given:
    """The server's settings and lease table before the request."""

    mode: str = "authoritative"
    pool: bool = False  # unknown clients get addresses from POOL (else they are ignored)
    leases: tuple[tuple[str, str, str, float], ...] = ()  # (ip, client, state, expires - NOW)
    pool_grants: bool = True  # False: the lease database is away
    pool_full: bool = False  # every pool address held by another client
    snap: str = "plain"  # SNAPS: "arm64" has arm64 loaders on every node type


@dataclass(frozen=True)
class Ask:
    """One request: message type (None: BOOTP), client, firmware and header/options."""

    kind: int | None
    client: str = "pc1"
    fw: str = "bios"
    requested: str | None = None  # option 50
    sid: str | None = None  # option 54: SERVER or OTHER_SERVER
    ciaddr: str = "0.0.0.0"
    giaddr: str = "0.0.0.0"
    opt82: bool = False
    broadcast: bool = False
    src: tuple[str, int] = ("0.0.0.0", 68)
    proxy_port: bool = False  # arrived on the proxyDHCP port (4011)
    raw: bytes | None = None  # send these bytes instead


@dataclass(frozen=True)
class Want:
    """The Decision expected; reply None means a Decision with no datagram (RELEASE/DECLINE)."""

    reply: int | None  # 2 OFFER, 5 ACK, 6 NAK, 0 BOOTREPLY (no option 53)
    dest: tuple[str, int, bool] = ("", 0, False)
    yiaddr: str = "0.0.0.0"
    file: bytes = b""
    siaddr: str = "0.0.0.0"
    has: dict[int, bytes | None] = field(default_factory=dict)  # None: present, any value
    lacks: tuple[int, ...] = ()
    lease: tuple[str, str, float | None] | None = None  # row: (ip, state, expires - NOW)
    lease_node: str | None = None
    event: str | None = None
    broadcast_flag: bool = False
    log: str = ""  # in the Decision's log line (a refused client)


REFUSED = Want(None, log="no offer")
PXE_OPTS = {60: b"PXEClient", 43: None, 54: socket.inet_aton(SERVER)}
KNOWN_OFFER = dict(dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER,
                   has={**PXE_OPTS, 1: socket.inet_aton("255.255.255.0"), 12: b"pc1",
                        51: LEASE.to_bytes(4, "big"), 58: (LEASE // 2).to_bytes(4, "big")},
                   lacks=(175,))
KNOWN_ACK_LEASE = dict(lease=(PC1_IP, BOUND, LEASE), lease_node="pc1", event="pc1")
POOL_OFFER = dict(dest=BCAST, yiaddr="10.77.0.100", siaddr=SERVER, file=BIOS_FILE,
                  has={51: DYN_LEASE.to_bytes(4, "big")}, lacks=(12,))
PROXY_OPTS = dict(siaddr=SERVER, file=BIOS_FILE, has=PXE_OPTS, lacks=(1, 3, 6, 12, 15, 51))
HELD = (("10.77.0.100", "other", BOUND, 300),)

CASES = [
    # --- DISCOVER: a known node's address and its firmware's boot file; no state event
    ("discover known bios", Given(), Ask(1), Want(2, file=BIOS_FILE, **KNOWN_OFFER)),
    ("discover known uefi x64", Given(), Ask(1, fw="uefi"), Want(2, file=UEFI_FILE, **KNOWN_OFFER)),
    # --- loaders by architecture: each its own slot, never another architecture's binary
    ("discover known uefi arm64 without an arm64 loader: refused, logged", Given(),
     Ask(1, fw="arm64"), Want(None, log="pc1 (" + PC1.control_mac + "): no loader for "
                                       "'uefi-arm64' clients")),
    ("discover known uefi arm64 with its type's arm64 loader", Given(snap="arm64"),
     Ask(1, fw="arm64"), Want(2, file=ARM64_FILE, **KNOWN_OFFER)),
    ("discover known arm64 http boot gets the arm64 http loader's URL", Given(snap="arm64"),
     Ask(1, fw="http-arm64"),
     Want(2, dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER,
          file=f"http://{SERVER}:8080/boot/{ARM64_HTTP}".encode(), has={60: b"HTTPClient"},
          lacks=(43, 175))),
    ("request arm64 without an arm64 loader: refused, no ACK", Given(),
     Ask(3, fw="arm64", requested=PC1_IP, sid=SERVER), REFUSED),
    ("discover stranger arm64 from the pool without a loader: refused", Given(pool=True),
     Ask(1, client="stranger", fw="arm64"), Want(None, log="unknown client")),
    ("discover an unregistered architecture: refused", Given(), Ask(1, fw="arch99"),
     Want(None, log="architecture type 99, not in the IANA registry")),
    ("proxy discover arm64 without a loader: refused", Given(mode="proxy"),
     Ask(1, fw="arm64"), REFUSED),
    ("discover known http boot", Given(), Ask(1, fw="http"),
     Want(2, dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER, file=HTTP_FILE,
          has={60: b"HTTPClient", 12: b"pc1"}, lacks=(43, 175))),
    ("discover known ipxe gets the script, not a binary", Given(), Ask(1, fw="ipxe"),
     Want(2, dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER, file=IPXE_FILE,
          has={**PXE_OPTS, 175: None})),
    ("discover known os client: bios file, no pxe options", Given(), Ask(1, fw="os"),
     Want(2, dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER, file=BIOS_FILE, has={12: b"pc1"},
          lacks=(60, 43, 175))),
    ("discover x86 32-bit uefi: its own slot has no default, refused", Given(),
     Ask(1, fw="ia32"), Want(None, log="no loader for 'uefi-ia32' clients")),
    ("discover known ignores requested address", Given(), Ask(1, requested="10.77.0.50"),
     Want(2, file=BIOS_FILE, **KNOWN_OFFER)),
    ("discover through a relay: to giaddr, option 82 echoed", Given(),
     Ask(1, giaddr=RELAY, opt82=True),
     Want(2, dest=VIA_RELAY, yiaddr=PC1_IP, siaddr=SERVER, file=BIOS_FILE, has={82: OPT82})),
    ("discover from a configured address, no broadcast flag: back to it", Given(),
     Ask(1, src=("10.77.0.2", 6800)),
     Want(2, dest=("10.77.0.2", 6800, False), yiaddr=PC1_IP, siaddr=SERVER, file=BIOS_FILE)),
    ("discover with broadcast flag from a configured address", Given(),
     Ask(1, src=("10.77.0.2", 68), broadcast=True),
     Want(2, dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER, file=BIOS_FILE, broadcast_flag=True)),
    ("discover stranger, unknown clients ignored", Given(), Ask(1, client="stranger"), None),
    ("discover a node's experiment MAC is a stranger", Given(), Ask(1, client="pc1.expt"), None),
    ("discover stranger from the pool", Given(pool=True), Ask(1, client="stranger"),
     Want(2, **POOL_OFFER)),
    ("discover stranger gets the free address it asks for", Given(pool=True),
     Ask(1, client="stranger", requested="10.77.0.105"),
     Want(2, **{**POOL_OFFER, "yiaddr": "10.77.0.105"})),
    ("discover stranger asking outside the pool gets a pool address", Given(pool=True),
     Ask(1, client="stranger", requested="10.77.0.3"), Want(2, **POOL_OFFER)),
    ("discover stranger skips an address another client holds", Given(pool=True, leases=HELD),
     Ask(1, client="stranger", requested="10.77.0.100"),
     Want(2, **{**POOL_OFFER, "yiaddr": "10.77.0.101"})),
    ("discover stranger keeps its bound address", Given(
        pool=True, leases=(("10.77.0.107", "stranger", BOUND, 300),)),
     Ask(1, client="stranger"), Want(2, **{**POOL_OFFER, "yiaddr": "10.77.0.107"})),
    ("discover stranger reuses an expired address only when nothing is fresh",
     Given(pool=True, pool_full=True, leases=(("10.77.0.104", "other", BOUND, -1),)),
     Ask(1, client="stranger"), Want(2, **{**POOL_OFFER, "yiaddr": "10.77.0.104"})),
    ("discover stranger, pool exhausted: silence", Given(pool=True, pool_full=True),
     Ask(1, client="stranger"), None),
    ("discover stranger while the lease database is away: silence",
     Given(pool=True, pool_grants=False), Ask(1, client="stranger"), None),
    ("discover known while the lease database is away: answered",
     Given(pool=True, pool_grants=False), Ask(1), Want(2, file=BIOS_FILE, **KNOWN_OFFER)),

    # --- REQUEST (RFC 2131 4.3.2): ACK commits a lease row and marks the node PXEBOOTING
    ("request selecting our offer", Given(), Ask(3, requested=PC1_IP, sid=SERVER),
     Want(5, dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER, file=BIOS_FILE,
          has={**PXE_OPTS, 12: b"pc1", 51: LEASE.to_bytes(4, "big")}, **KNOWN_ACK_LEASE)),
    ("request selecting, uefi", Given(), Ask(3, fw="uefi", requested=PC1_IP, sid=SERVER),
     Want(5, dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER, file=UEFI_FILE, **KNOWN_ACK_LEASE)),
    ("request selecting another server's offer: silence", Given(),
     Ask(3, requested=PC1_IP, sid=OTHER_SERVER), None),
    ("request init-reboot for its address", Given(), Ask(3, requested=PC1_IP),
     Want(5, dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER, file=BIOS_FILE, **KNOWN_ACK_LEASE)),
    ("request renewing: unicast to ciaddr", Given(), Ask(3, ciaddr=PC1_IP, src=(PC1_IP, 68)),
     Want(5, dest=(PC1_IP, 68, False), yiaddr=PC1_IP, siaddr=SERVER, file=BIOS_FILE,
          **KNOWN_ACK_LEASE)),
    ("request through a relay", Given(), Ask(3, requested=PC1_IP, giaddr=RELAY, opt82=True),
     Want(5, dest=VIA_RELAY, yiaddr=PC1_IP, siaddr=SERVER, file=BIOS_FILE, has={82: OPT82},
          **KNOWN_ACK_LEASE)),
    ("request known, wrong address: NAK", Given(), Ask(3, requested="10.77.0.50"),
     Want(6, dest=BCAST, has={56: b"wrong address"}, lacks=(51, 67))),
    ("request known, wrong address via relay: NAK with broadcast flag", Given(),
     Ask(3, requested="10.77.0.50", giaddr=RELAY, opt82=True),
     Want(6, dest=VIA_RELAY, has={56: b"wrong address", 82: OPT82}, broadcast_flag=True)),
    ("request wrong address from a configured source: NAK back to it", Given(),
     Ask(3, requested="10.77.0.50", src=("10.77.0.50", 68)),
     Want(6, dest=("10.77.0.50", 68, False), has={56: b"wrong address"})),
    ("request with neither ciaddr nor option 50: dropped", Given(), Ask(3), None),
    ("request with a 3-byte option 50: malformed", Given(),
     Ask(3, raw=b"request50"), None),
    ("request stranger not served, selecting us: NAK", Given(),
     Ask(3, client="stranger", requested="10.77.0.100", sid=SERVER),
     Want(6, dest=BCAST, has={56: b"unknown client"})),
    ("request stranger not served, init-reboot: silence", Given(),
     Ask(3, client="stranger", requested="10.77.0.100"), None),
    ("request stranger selecting its pool offer", Given(
        pool=True, leases=(("10.77.0.103", "stranger", OFFERED, OFFER_HOLD),)),
     Ask(3, client="stranger", requested="10.77.0.103", sid=SERVER),
     Want(5, dest=BCAST, yiaddr="10.77.0.103", siaddr=SERVER, file=BIOS_FILE,
          has={51: DYN_LEASE.to_bytes(4, "big")}, lacks=(12,),
          lease=("10.77.0.103", BOUND, DYN_LEASE))),
    ("request stranger selecting an offer we forgot (restart), still free", Given(pool=True),
     Ask(3, client="stranger", requested="10.77.0.108", sid=SERVER),
     Want(5, dest=BCAST, yiaddr="10.77.0.108", siaddr=SERVER, file=BIOS_FILE,
          lease=("10.77.0.108", BOUND, DYN_LEASE))),
    ("request stranger selecting an address another client holds: NAK",
     Given(pool=True, leases=HELD),
     Ask(3, client="stranger", requested="10.77.0.100", sid=SERVER),
     Want(6, dest=BCAST, has={56: b"address not available"})),
    ("request stranger init-reboot off our network: NAK", Given(pool=True),
     Ask(3, client="stranger", requested="192.168.1.5"),
     Want(6, dest=BCAST, has={56: b"wrong network"})),
    ("request stranger init-reboot on our network, no record: silence", Given(pool=True),
     Ask(3, client="stranger", requested="10.77.0.50"), None),
    ("request stranger init-reboot for another address than its lease: NAK",
     Given(pool=True, leases=(("10.77.0.102", "stranger", BOUND, 300),)),
     Ask(3, client="stranger", requested="10.77.0.106"),
     Want(6, dest=BCAST, has={56: b"wrong address"})),
    ("request stranger renewing its lease", Given(
        pool=True, leases=(("10.77.0.102", "stranger", BOUND, 300),)),
     Ask(3, client="stranger", ciaddr="10.77.0.102", src=("10.77.0.102", 68)),
     Want(5, dest=("10.77.0.102", 68, False), yiaddr="10.77.0.102", siaddr=SERVER,
          file=BIOS_FILE, lease=("10.77.0.102", BOUND, DYN_LEASE))),
    ("request stranger while the lease database is away: silence", Given(
        pool=True, pool_grants=False, leases=(("10.77.0.103", "stranger", OFFERED, 60),)),
     Ask(3, client="stranger", requested="10.77.0.103", sid=SERVER), None),
    ("request known while the lease database is away: ACK", Given(pool=True, pool_grants=False),
     Ask(3, requested=PC1_IP, sid=SERVER),
     Want(5, dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER, file=BIOS_FILE, **KNOWN_ACK_LEASE)),

    # --- RELEASE / DECLINE: no reply, a lease row; INFORM: options only
    ("release its lease", Given(pool=True, leases=(("10.77.0.102", "stranger", BOUND, 300),)),
     Ask(7, client="stranger", ciaddr="10.77.0.102", sid=SERVER),
     Want(None, lease=("10.77.0.102", "released", 0))),
    ("release someone else's address: ignored", Given(pool=True, leases=HELD),
     Ask(7, client="stranger", ciaddr="10.77.0.100", sid=SERVER), None),
    ("release addressed to another server: ignored",
     Given(pool=True, leases=(("10.77.0.102", "stranger", BOUND, 300),)),
     Ask(7, client="stranger", ciaddr="10.77.0.102", sid=OTHER_SERVER), None),
    ("decline its offer", Given(pool=True, leases=(("10.77.0.103", "stranger", OFFERED, 60),)),
     Ask(4, client="stranger", requested="10.77.0.103", sid=SERVER),
     Want(None, lease=("10.77.0.103", DECLINED, DECLINE_HOLD))),
    ("decline without option 50: ignored", Given(pool=True), Ask(4, client="stranger"), None),
    ("inform known: options, no address, no lease", Given(),
     Ask(8, ciaddr=PC1_IP, src=(PC1_IP, 68)),
     Want(5, dest=(PC1_IP, 68, False), siaddr=SERVER, file=BIOS_FILE, has={12: b"pc1"},
          lacks=(51, 58, 59), event="pc1")),
    ("inform stranger, unknown clients ignored", Given(), Ask(8, client="stranger"), None),

    # --- BOOTP (no option 53)
    ("bootp known: its address for good, no pxe options", Given(), Ask(None),
     Want(0, dest=BCAST, yiaddr=PC1_IP, siaddr=SERVER, file=BIOS_FILE, has={12: b"pc1"},
          lacks=(53, 60, 43, 51), lease=(PC1_IP, BOUND, BOOTP_LEASE), lease_node="pc1",
          event="pc1")),
    ("bootp stranger from the pool", Given(pool=True), Ask(None, client="stranger"),
     Want(0, dest=BCAST, yiaddr="10.77.0.100", siaddr=SERVER, file=BIOS_FILE, lacks=(53,),
          lease=("10.77.0.100", BOUND, BOOTP_LEASE))),
    ("bootp in proxy mode: dropped", Given(mode="proxy"), Ask(None), None),

    # --- proxyDHCP (PXE 2.1): boot information, never an address
    ("proxy discover pxe on 67", Given(mode="proxy"), Ask(1),
     Want(2, dest=BCAST, event="pc1", **PROXY_OPTS)),
    ("proxy discover uefi on 67", Given(mode="proxy"), Ask(1, fw="uefi"),
     Want(2, dest=BCAST, event="pc1", **{**PROXY_OPTS, "file": UEFI_FILE})),
    ("proxy discover ipxe", Given(mode="proxy"), Ask(1, fw="ipxe"),
     Want(2, dest=BCAST, event="pc1", **{**PROXY_OPTS, "file": IPXE_FILE})),
    ("proxy ignores an os client", Given(mode="proxy"), Ask(1, fw="os"), None),
    ("proxy ignores a stranger (unknown clients ignored)", Given(mode="proxy"),
     Ask(1, client="stranger"), None),
    ("proxy request on 67 for the site's server: not ours", Given(mode="proxy"),
     Ask(3, requested=PC1_IP, sid=OTHER_SERVER), None),
    ("proxy request on 67 naming us", Given(mode="proxy"), Ask(3, requested=PC1_IP, sid=SERVER),
     Want(5, dest=BCAST, event="pc1", **PROXY_OPTS)),
    ("proxy request on 4011: straight back to the client", Given(mode="proxy"),
     Ask(3, ciaddr=PC1_IP, src=(PC1_IP, 4011), proxy_port=True),
     Want(5, dest=(PC1_IP, 4011, False), event="pc1", **PROXY_OPTS)),
    ("proxy request on 4011 from 0.0.0.0: broadcast", Given(mode="proxy"),
     Ask(3, proxy_port=True), Want(5, dest=BCAST, event="pc1", **PROXY_OPTS)),
    ("proxy decline: not answered", Given(mode="proxy"), Ask(4, requested=PC1_IP), None),

    # --- bad input: counted, dropped, never raised
    ("garbage", Given(), Ask(1, raw=b"\x01\x02\x03"), None),
    ("a reply (op 2) sent to the server", Given(), Ask(1, raw=b"op2"), None),
    ("two-byte message type", Given(), Ask(1, raw=b"type2"), None),
    ("unknown message type", Given(), Ask(1, raw=b"type99"), None),
]


def make_engine(given: Given) -> Engine:
    dhcp: dict[str, Any] = {"address": SERVER, "mode": given.mode, "lease_time": LEASE,
                            "dynamic_lease_time": DYN_LEASE}
    if given.pool:
        dhcp.update(unknown_clients="pool", dynamic_pool=POOL)
    cfg = build({"server": {"public_address": SERVER}, "http": {"port": 8080}, "dhcp": dhcp})
    engine = Engine(Settings.from_config(cfg, "t"), partial(dhcp_boot, cfg=cfg))
    engine.pool_grants = given.pool_grants
    if given.pool_full:
        for k in range(100, 111):
            engine.leases.put(f"10.77.0.{k}", f"02:ff:00:00:00:{k:02x}", BOUND, NOW + 300)
    for ip, client, state, left in given.leases:
        engine.leases.put(ip, MACS[client].hex(":"), state, NOW + left)
    return engine


def packet(ask: Ask) -> bytes:
    opts: dict[int, bytes] = {} if ask.kind is None else {53: bytes([ask.kind])}
    opts.update(FIRMWARE[ask.fw])
    if ask.requested:
        opts[50] = socket.inet_aton(ask.requested)
    if ask.sid:
        opts[54] = socket.inet_aton(ask.sid)
    if ask.opt82:
        opts[82] = OPT82
    msg = DhcpMessage(1, xid=0x5EED, chaddr=MACS[ask.client], ciaddr=ask.ciaddr,
                      giaddr=ask.giaddr, flags=0x8000 if ask.broadcast else 0, options=opts)
    good = encode(msg)
    bad = {b"request50": lambda: encode(DhcpMessage(1, chaddr=MACS[ask.client],
                                                    options={53: b"\x03", 50: b"\x0a\x4d\x00"})),
           b"op2": lambda: b"\x02" + good[1:],
           b"type2": lambda: encode(DhcpMessage(1, chaddr=MACS[ask.client],
                                                options={53: b"\x01\x01"})),
           b"type99": lambda: encode(DhcpMessage(1, chaddr=MACS[ask.client], options={53: b"c"}))}
    if ask.raw is None:
        return good
    return bad[ask.raw]() if ask.raw in bad else ask.raw


def decide(given: Given, ask: Ask) -> tuple[Engine, Decision | None]:
    engine = make_engine(given)
    return engine, engine.handle(packet(ask), ask.src[0], ask.src[1], NOW, SNAPS[given.snap],
                                 proxy_port=ask.proxy_port)


@pytest.mark.parametrize("given, ask, want", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_decision(given: Given, ask: Ask, want: Want | None) -> None:
    engine, d = decide(given, ask)
    if want is None:
        assert d is None or (d.data == b"" and d.lease is None), d
        return
    assert d is not None
    assert d.event_node == want.event
    if want.lease is None:
        assert d.lease is None
    else:
        ip, state, left = want.lease
        assert d.lease is not None
        assert (d.lease["ip"], d.lease["state"], d.lease["node_id"], d.lease["mac"]) == \
            (ip, state, want.lease_node, MACS[ask.client].hex(":"))
        assert d.lease["expires"] == NOW + left and d.lease["updated"] == NOW
        held = engine.leases.get(ip)
        assert held is not None and held.state == state  # the table agrees with the row
    if want.log:
        assert d.log is not None and want.log in d.log, d.log
        assert engine.counters["refused_arch"] == 1
    else:
        assert d.log is None
    if want.reply is None:
        assert d.data == b""
        return
    assert (d.ip, d.port, d.broadcast) == want.dest
    reply = decode(d.data)
    assert reply.op == 2 and reply.xid == 0x5EED and reply.chaddr[:6] == MACS[ask.client]
    assert reply.options.get(53) == (bytes([want.reply]) if want.reply else None)
    assert socket.inet_ntoa(reply.yiaddr) == want.yiaddr
    assert socket.inet_ntoa(reply.siaddr) == want.siaddr
    assert reply.boot_file == want.file
    if want.file:
        assert reply.options.get(67) == want.file
        assert reply.options.get(66) == want.siaddr.encode()
    assert reply.giaddr == socket.inet_aton(ask.giaddr)
    assert bool(reply.flags & 0x8000) == want.broadcast_flag
    for code, value in want.has.items():
        assert code in reply.options, code
        if value is not None:
            assert reply.options[code] == value, code
    for code in want.lacks:
        assert code not in reply.options, code
    if want.reply == 2 and want.yiaddr not in (PC1_IP, "0.0.0.0"):
        held = engine.leases.get(want.yiaddr)  # a pool offer holds its address
        assert held is not None and held.state in (OFFERED, BOUND)


def test_every_drop_is_counted() -> None:
    """Bad input never raises; each kind of drop has its counter."""
    for raw, counter in ((b"\x01\x02\x03", "malformed"), (b"op2", "dropped"),
                         (b"type2", "malformed"), (b"type99", "unexpected_type"),
                         (b"request50", "malformed")):
        engine, d = decide(Given(), Ask(1, raw=raw))
        assert d is None and engine.counters[counter] == 1, raw


def test_targets_follow_the_snapshot_generation() -> None:
    """A reply is cached per client and firmware; a new snapshot generation drops it."""
    from dataclasses import replace

    from bootherd.inventory.memory import with_nodes

    engine = make_engine(Given())
    first = engine.handle(packet(Ask(1)), "0.0.0.0", 68, NOW, SNAP)
    assert first is not None and decode(first.data).boot_file == BIOS_FILE
    changed = with_nodes(SNAP, replace(PC1, loaders={**PC1.loaders, "bios": "custom.kpxe"}))
    again = engine.handle(packet(Ask(1)), "0.0.0.0", 68, NOW, changed)
    assert again is not None and decode(again.data).boot_file == b"custom.kpxe"
    uefi = engine.handle(packet(Ask(1, fw="uefi")), "0.0.0.0", 68, NOW, changed)
    assert uefi is not None and decode(uefi.data).boot_file == UEFI_FILE


def test_the_engine_imports_no_database_code() -> None:
    code = ("import sys\nimport bootherd.dhcp.engine\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('sqlalchemy', 'sqlite3', 'psycopg', 'alembic')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
