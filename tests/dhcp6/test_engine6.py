"""The DHCPv6 engine's decisions, as a table: one message in a given state, one Decision out.

No sockets, no database, no clock: an Engine6 over an in-memory snapshot whose nodes have
IPv6 control addresses; the socket-level tests against real clients (dhclient -6,
dhcpcd) are test_dhcp6_netns.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import partial

import pytest

from bootherd.config import build
from bootherd.dhcp.leases import BOUND, DECLINED, OFFERED, RELEASED
from bootherd.dhcp6 import codec
from bootherd.dhcp6.codec import IaAddr, IaNa, Message, MsgType, Opt, Status
from bootherd.dhcp6.engine import Engine6, Settings6, server_duid
from bootherd.inventory.memory import snapshot_from_text
from bootherd.inventory.testbed import generate
from bootherd.policy import dhcp6_boot

NOW = 1_000_000.0
SERVER6 = "fd77::1"
POOL = "fd77::1000-fd77::100f"


def _v6_testbed() -> str:
    """generate()'s testbed with control IPv6 addresses fd77::<n> and arm64 loaders."""
    text = generate(6, subnet="10.77.0.0/24")
    head, sep, tail = text.partition("[[nodes]]")
    head = head.replace('loader_ipxe = ""\n', 'loader_ipxe = ""\nloaders = { uefi-arm64 = '
                        '"arm64/grubnetaa64.efi" }\n')
    n = 0
    chunks = tail.split("[[nodes.interfaces]]")
    for i, c in enumerate(chunks):
        if 'role = "ctrl"' in c:
            n += 1
            chunks[i] = c.replace('ip6 = ""', f'ip6 = "fd77::{n + 1:x}"', 1)
    return head + sep + "[[nodes.interfaces]]".join(chunks)


SNAP = snapshot_from_text(_v6_testbed())
PC1 = SNAP.nodes["pc1"]
PC1_MAC = bytes.fromhex(PC1.control_mac.replace(":", ""))
STRANGER_MAC = bytes.fromhex("0a0b0c0d0e01")
DUIDS = {
    "pc1-ll": b"\x00\x03\x00\x01" + PC1_MAC,  # DUID-LL: the MAC is in it
    "pc1-llt": b"\x00\x01\x00\x01\x11\x22\x33\x44" + PC1_MAC,
    "pc1-uuid": b"\x00\x04" + bytes(range(16)),  # DUID-UUID (OVMF): MAC from the source
    "stranger": b"\x00\x03\x00\x01" + STRANGER_MAC,
    "other": b"\x00\x03\x00\x01" + bytes.fromhex("0a0b0c0d0e02"),
}


def eui64(mac: bytes) -> str:
    b = bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:]
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + b))


PC1_LL = eui64(PC1_MAC)
STRANGER_LL = eui64(STRANGER_MAC)
OTHER_DUID = server_duid("another-server")
VC = {"pxe-x64": codec.encode_vendor_class(343, [b"PXEClient:Arch:00007:UNDI:003000"]),
      "http-x64": codec.encode_vendor_class(343, [b"HTTPClient:Arch:00016:UNDI:003000"]),
      "pxe-arm64": codec.encode_vendor_class(343, [b"PXEClient:Arch:00011:UNDI:003000"]),
      "pxe-ia32": codec.encode_vendor_class(343, [b"PXEClient:Arch:00006:UNDI:003000"])}
ARCH = {"pxe-x64": 7, "http-x64": 16, "pxe-arm64": 11, "pxe-ia32": 6}


@dataclass(frozen=True)
class Given:
    pool: bool = False
    leases: tuple[tuple[str, str, str, float], ...] = ()  # (ip, duid name, state, left)
    pool_grants: bool = True


@dataclass(frozen=True)
class Ask:
    mt: int
    duid: str | None = "pc1-ll"
    src: str = PC1_LL
    sid: str | None = None  # "ours" or "other"
    ia: tuple[str, ...] | None = ()  # requested addresses in one IA_NA; None: no IA_NA
    fw: str | None = None  # VC key, or "ipxe"
    rapid: bool = False
    relay: bool = False  # wrapped in a RELAY-FORW with option 79 (the MAC)


@dataclass(frozen=True)
class Want:
    mt: int | None  # None: a Decision with no datagram
    addr: str | None = None  # the IAADDR granted (valid lifetime > 0)
    valid: int | None = None
    status: int | None = None  # top-level status code
    ia_status: int | None = None
    url: bytes | None = None  # option 59
    lacks: tuple[int, ...] = ()
    lease: tuple[str, str] | None = None  # committed row: (ip, state)
    event: str | None = None
    log: str = ""


def make_engine(given: Given) -> Engine6:
    d6 = {"address": SERVER6, "enabled": True}
    if given.pool:
        d6.update(unknown_clients="pool", pool=POOL)
    cfg = build({"server": {"public_address": "10.77.0.1", "public_address6": SERVER6},
                 "http": {"port": 8080}, "dhcp6": d6})
    e = Engine6(Settings6.from_config(cfg, "t"), partial(dhcp6_boot, cfg=cfg))
    e.pool_grants = given.pool_grants
    for ip, who, state, left in given.leases:
        key = f"{DUIDS[who].hex()}/00000001"
        e.leases.put(ip, key, state, NOW + left, None, key)
    return e


def message(ask: Ask, engine: Engine6) -> bytes:
    opts: list[tuple[int, bytes]] = []
    if ask.duid:
        opts.append((Opt.CLIENTID, DUIDS[ask.duid]))
    if ask.sid:
        opts.append((Opt.SERVERID, engine.settings.duid if ask.sid == "ours" else OTHER_DUID))
    if ask.ia is not None:
        sub = [(Opt.IAADDR, codec.encode_iaaddr(IaAddr(ipaddress.IPv6Address(a).packed, 0, 0)))
               for a in ask.ia]
        opts.append((Opt.IA_NA, codec.encode_ia_na(IaNa(1, 0, 0, sub))))
    opts.append((Opt.ORO, b"\x00\x17\x00\x3b"))
    opts.append((Opt.ELAPSED_TIME, b"\x00\x00"))
    if ask.fw == "ipxe":
        opts.append((Opt.USER_CLASS, codec.opaque_list([b"iPXE"])))
    elif ask.fw:
        opts.append((Opt.VENDOR_CLASS, VC[ask.fw]))
        opts.append((Opt.CLIENT_ARCH, ARCH[ask.fw].to_bytes(2, "big")))
    if ask.rapid:
        opts.append((Opt.RAPID_COMMIT, b""))
    data = codec.encode(Message(ask.mt, 0xABCDE, opts))
    if ask.relay:
        mac = PC1_MAC if ask.duid and ask.duid.startswith("pc1") else STRANGER_MAC
        data = codec.encode(Message(MsgType.RELAY_FORW, 0, [
            (Opt.INTERFACE_ID, b"sw1/7"), (Opt.CLIENT_LINKLAYER_ADDR, b"\x00\x01" + mac),
            (Opt.RELAY_MSG, data)], 0, ipaddress.IPv6Address("fd77:9::1").packed,
            ipaddress.IPv6Address("fe80::1").packed))
    return data


PC1_IP6 = PC1.control_ip6
TFTP_URL = f"tftp://[{SERVER6}]/snponly.efi".encode()
LEASE, DYN = 86400, 600
ACK = dict(addr=PC1_IP6, valid=LEASE, lease=(PC1_IP6, BOUND), event="pc1")

CASES = [
    # --- SOLICIT: ADVERTISE with the node's inventory address; boot clients get option 59
    ("solicit known by DUID-LL", Given(), Ask(MsgType.SOLICIT),
     Want(MsgType.ADVERTISE, addr=PC1_IP6, valid=LEASE, lacks=(Opt.BOOTFILE_URL,))),
    ("solicit known by DUID-LLT", Given(), Ask(MsgType.SOLICIT, duid="pc1-llt"),
     Want(MsgType.ADVERTISE, addr=PC1_IP6)),
    ("solicit DUID-UUID known by its EUI-64 link-local source (OVMF)", Given(),
     Ask(MsgType.SOLICIT, duid="pc1-uuid", fw="pxe-x64"),
     Want(MsgType.ADVERTISE, addr=PC1_IP6, url=TFTP_URL)),
    ("solicit uefi http boot gets the http URL and HTTPClient", Given(),
     Ask(MsgType.SOLICIT, fw="http-x64"),
     Want(MsgType.ADVERTISE, addr=PC1_IP6,
          url=f"http://[{SERVER6}]:8080/boot/ipxe.efi".encode())),
    ("solicit ipxe gets the script URL", Given(), Ask(MsgType.SOLICIT, fw="ipxe"),
     Want(MsgType.ADVERTISE, addr=PC1_IP6,
          url=f"http://[{SERVER6}]:8080/ipxe?mac=${{netX/mac:hexhyp}}".encode())),
    ("solicit arm64 gets its own slot's loader", Given(), Ask(MsgType.SOLICIT, fw="pxe-arm64"),
     Want(MsgType.ADVERTISE, addr=PC1_IP6,
          url=f"tftp://[{SERVER6}]/arm64/grubnetaa64.efi".encode())),
    ("solicit ia32 without a loader: refused, logged", Given(),
     Ask(MsgType.SOLICIT, fw="pxe-ia32"), Want(None, log="no loader for 'uefi-ia32'")),
    ("solicit with rapid commit: REPLY, committed", Given(), Ask(MsgType.SOLICIT, rapid=True),
     Want(MsgType.REPLY, **ACK)),
    ("solicit through a relay: option 79 names the node", Given(),
     Ask(MsgType.SOLICIT, duid="pc1-uuid", src="fd77:9::1", relay=True),
     Want(MsgType.ADVERTISE, addr=PC1_IP6)),
    ("solicit stranger, unknown clients ignored", Given(),
     Ask(MsgType.SOLICIT, duid="stranger", src=STRANGER_LL), None),
    ("solicit stranger from the pool", Given(pool=True),
     Ask(MsgType.SOLICIT, duid="stranger", src=STRANGER_LL),
     Want(MsgType.ADVERTISE, addr="fd77::1000", valid=DYN)),
    ("solicit stranger gets the free pool address it asks for", Given(pool=True),
     Ask(MsgType.SOLICIT, duid="stranger", src=STRANGER_LL, ia=("fd77::1005",)),
     Want(MsgType.ADVERTISE, addr="fd77::1005")),
    ("solicit stranger skips an address another client holds",
     Given(pool=True, leases=(("fd77::1000", "pc1-llt", BOUND, 300),)),
     Ask(MsgType.SOLICIT, duid="stranger", src=STRANGER_LL),
     Want(MsgType.ADVERTISE, addr="fd77::1001")),
    ("solicit with a server id: malformed", Given(), Ask(MsgType.SOLICIT, sid="ours"), None),
    ("solicit without a client id: malformed", Given(), Ask(MsgType.SOLICIT, duid=None), None),
    # --- REQUEST / RENEW / REBIND: REPLY after the lease row commits, PXEBOOTING
    ("request ours", Given(), Ask(MsgType.REQUEST, sid="ours", ia=(PC1_IP6,)),
     Want(MsgType.REPLY, **ACK)),
    ("request another server's advertise: silence", Given(),
     Ask(MsgType.REQUEST, sid="other"), None),
    ("request a wrong address: ours granted, theirs at lifetime 0", Given(),
     Ask(MsgType.REQUEST, sid="ours", ia=("fd77::99",)), Want(MsgType.REPLY, **ACK)),
    ("renew ours", Given(), Ask(MsgType.RENEW, sid="ours", ia=(PC1_IP6,)),
     Want(MsgType.REPLY, **ACK)),
    ("rebind a pool client we know", Given(pool=True, leases=(("fd77::1003", "stranger",
                                                               BOUND, 60),)),
     Ask(MsgType.REBIND, duid="stranger", src=STRANGER_LL, ia=("fd77::1003",)),
     Want(MsgType.REPLY, addr="fd77::1003", valid=DYN, lease=("fd77::1003", BOUND))),
    ("rebind a pool client we never saw: silence", Given(pool=True),
     Ask(MsgType.REBIND, duid="stranger", src=STRANGER_LL, ia=("fd77::1003",)), None),
    ("request from the pool while the lease database is away: silence",
     Given(pool=True, pool_grants=False),
     Ask(MsgType.REQUEST, duid="stranger", src=STRANGER_LL, sid="ours"), None),
    ("request known while the lease database is away: answered",
     Given(pool=True, pool_grants=False), Ask(MsgType.REQUEST, sid="ours"),
     Want(MsgType.REPLY, **ACK)),
    # --- CONFIRM, RELEASE, DECLINE, INFORMATION-REQUEST
    ("confirm its own address", Given(), Ask(MsgType.CONFIRM, ia=(PC1_IP6,)),
     Want(MsgType.REPLY, status=Status.SUCCESS)),
    ("confirm an address from elsewhere: not on link", Given(),
     Ask(MsgType.CONFIRM, ia=("2001:db8::5",)), Want(MsgType.REPLY, status=Status.NOT_ON_LINK)),
    ("confirm with no address: silence", Given(), Ask(MsgType.CONFIRM), None),
    ("release", Given(pool=True, leases=(("fd77::1003", "stranger", BOUND, 60),)),
     Ask(MsgType.RELEASE, duid="stranger", src=STRANGER_LL, sid="ours", ia=("fd77::1003",)),
     Want(MsgType.REPLY, status=Status.SUCCESS, lease=("fd77::1003", RELEASED))),
    ("decline", Given(pool=True, leases=(("fd77::1003", "stranger", BOUND, 60),)),
     Ask(MsgType.DECLINE, duid="stranger", src=STRANGER_LL, sid="ours", ia=("fd77::1003",)),
     Want(MsgType.REPLY, status=Status.SUCCESS, lease=("fd77::1003", DECLINED))),
    ("information-request from a boot client", Given(),
     Ask(MsgType.INFORMATION_REQUEST, ia=None, fw="pxe-x64"),
     Want(MsgType.REPLY, url=TFTP_URL, lacks=(Opt.IA_NA,))),
    ("advertise is not ours to answer", Given(), Ask(MsgType.ADVERTISE), None),
]


def _ia_addrs(reply: Message) -> list[IaAddr]:
    out = []
    for raw in reply.all(Opt.IA_NA):
        out += codec.decode_ia_na(raw).addresses()
    return out


@pytest.mark.parametrize("given, ask, want", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_decision(given: Given, ask: Ask, want: Want | None) -> None:
    engine = make_engine(given)
    d = engine.handle(message(ask, engine), ask.src, 546, NOW, SNAP)
    if want is None:
        assert d is None, d
        return
    assert d is not None
    if want.log:
        assert d.log and want.log in d.log, d.log
        assert engine.counters["refused_arch"] == 1 and not d.data
        return
    assert d.log is None
    assert d.event_node == want.event
    if want.lease is None:
        assert d.lease is None
    else:
        assert d.lease is not None and (d.lease["ip"], d.lease["state"]) == want.lease
        assert ":" in d.lease["mac"] and len(d.lease["mac"]) == 17
        held = engine.leases.get(want.lease[0])
        assert held is not None and held.state == want.lease[1]
    data = d.data
    outer = codec.decode(data)
    if ask.relay:
        assert outer.msg_type == MsgType.RELAY_REPL and outer.get(Opt.INTERFACE_ID) == b"sw1/7"
        assert (d.ip, d.port) == (ask.src, 547)
        data = outer.get(Opt.RELAY_MSG)
    else:
        assert (d.ip, d.port) == (ask.src, 546)
    reply = codec.decode(data)
    assert reply.msg_type == want.mt and reply.xid == 0xABCDE
    assert reply.get(Opt.SERVERID) == engine.settings.duid
    assert reply.get(Opt.CLIENTID) == (DUIDS[ask.duid] if ask.duid else None)
    granted = [a for a in _ia_addrs(reply) if a.valid > 0]
    if want.addr:
        assert [str(ipaddress.IPv6Address(a.address)) for a in granted] == [want.addr]
        if want.valid is not None:
            assert granted[0].valid == want.valid
    if want.status is not None:
        assert codec.decode_status(reply.get(Opt.STATUS_CODE))[0] == want.status
    assert reply.get(Opt.BOOTFILE_URL) == want.url
    if ask.fw == "http-x64":
        assert codec.vendor_class(reply.get(Opt.VENDOR_CLASS))[1] == [b"HTTPClient"]
    for code in want.lacks:
        assert reply.get(code) is None
    if want.mt == MsgType.ADVERTISE and want.addr and want.addr != PC1_IP6:
        held = engine.leases.get(want.addr)
        assert held is not None and held.state == OFFERED  # an advertise holds its address


def test_full_exchange_then_the_pool_address_sticks() -> None:
    """SOLICIT -> ADVERTISE -> REQUEST -> REPLY for a pool client; a new SOLICIT from the
    same client gets the same address, another client a different one."""
    e = make_engine(Given(pool=True))
    s = Ask(MsgType.SOLICIT, duid="stranger", src=STRANGER_LL)
    adv = codec.decode(e.handle(message(s, e), STRANGER_LL, 546, NOW, SNAP).data)
    addr = str(ipaddress.IPv6Address(_ia_addrs(adv)[0].address))
    r = e.handle(message(Ask(MsgType.REQUEST, duid="stranger", src=STRANGER_LL, sid="ours",
                             ia=(addr,)), e), STRANGER_LL, 546, NOW + 1, SNAP)
    assert r.lease["ip"] == addr and r.lease["state"] == BOUND
    again = codec.decode(e.handle(message(s, e), STRANGER_LL, 546, NOW + 2, SNAP).data)
    assert str(ipaddress.IPv6Address(_ia_addrs(again)[0].address)) == addr
    other = codec.decode(e.handle(message(Ask(MsgType.SOLICIT, duid="other", src="fe80::77"),
                                          e), "fe80::77", 546, NOW + 2, SNAP).data)
    assert _ia_addrs(other)[0].address != _ia_addrs(again)[0].address


def test_pool_exhausted_is_no_addrs_avail() -> None:
    e = make_engine(Given(pool=True, leases=tuple(
        (f"fd77::{0x1000 + k:x}", "pc1-llt", BOUND, 300) for k in range(16))))
    d = e.handle(message(Ask(MsgType.SOLICIT, duid="stranger", src=STRANGER_LL), e),
                 STRANGER_LL, 546, NOW, SNAP)
    ia = codec.decode_ia_na(codec.decode(d.data).get(Opt.IA_NA))
    assert codec.decode_status(ia.options[0][1])[0] == Status.NO_ADDRS_AVAIL
