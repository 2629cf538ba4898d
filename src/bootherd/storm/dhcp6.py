"""The IPv6 profile's firmware DHCPv6, through a relay agent, for virtual nodes.

A UEFI node booting over IPv6 (PXEv6 or HTTP boot) sends SOLICIT, takes the ADVERTISE,
sends REQUEST and gets a REPLY with its address (IA_NA) and the boot file URL (option
59, RFC 5970).  As on a provisioning network with routers between the racks and the
boot server, the messages reach the server through a relay agent: one relay socket
per storm process (`Dhcp6Relay`) wraps each message in a RELAY-FORW whose peer address
is the node's EUI-64 link-local address and which carries the node's MAC (option 79,
RFC 6939; the firmware itself sends a DUID-UUID, as OVMF does), and hands the
RELAY-REPL's inner message to the node by transaction id.

Timers are RFC 8415's (section 7.6): SOLICIT from 1 s doubling to 32 s (6 tries, then
the firmware gives up), REQUEST from 1 s doubling to 30 s, 10 tries; each timeout
with the RFC's +-10 % randomisation, so a burst does not retransmit in step.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import struct
from urllib.parse import urlsplit

from ..dhcp6.codec import (
    IaAddr,
    IaNa,
    Message,
    MsgType,
    Opt,
    decode,
    decode_ia_na,
    decode_status,
    encode,
    encode_ia_na,
    encode_iaaddr,
    encode_vendor_class,
)
from ..dhcp6.codec import MalformedPacket as Malformed6
from .clients import RELAY_RCVBUF, ProtocolFailure, Tally, node_uuid
from .net import Endpoint, Loss, open_udp

SERVER_PORT = 547  # a relay agent listens, and is answered, on the server port
SOLICIT_TIMEOUTS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
REQUEST_TIMEOUTS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0)
IANA_ENTERPRISE = 343  # Intel: the PXE vendor class of UEFI firmware
# UEFI x64 firmware: PXE over IPv6 (architecture 7) or HTTP boot (16), as EDK2 says it.
FIRMWARE = {
    "pxe": (7, b"PXEClient:Arch:00007:UNDI:003016"),
    "http": (16, b"HTTPClient:Arch:00016:UNDI:003016"),
}


def link_local(mac: bytes) -> bytes:
    """fe80::/64 with the modified EUI-64 interface identifier of `mac`."""
    eui = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return b"\xfe\x80" + bytes(6) + eui


class Dhcp6Relay:
    """One relay agent socket shared by every node of a process."""

    def __init__(self, ep: Endpoint, address: str):
        self.ep = ep
        self.address = address
        self.link = ipaddress.IPv6Address(address).packed  # the link the nodes are on
        self.waiting: dict[int, Endpoint] = {}
        self.stray = 0
        ep.datagram_received = self._received  # type: ignore[method-assign]

    @classmethod
    async def open(cls, loss: Loss, address: str) -> Dhcp6Relay:
        ep = await open_udp(loss, address, SERVER_PORT, reuse=True, rcvbuf=RELAY_RCVBUF)
        return cls(ep, address)

    def xid(self) -> int:
        """A transaction id no waiting node of this process holds (24 bits)."""
        while True:
            x = random.getrandbits(24)
            if x not in self.waiting:
                return x

    def forward(self, inner: bytes, mac: bytes, server: tuple[str, int]) -> None:
        msg = Message(MsgType.RELAY_FORW, options=[
            (Opt.CLIENT_LINKLAYER_ADDR, b"\x00\x01" + mac),  # hardware type 1: Ethernet
            (Opt.RELAY_MSG, inner)], hop_count=0, link_address=self.link,
            peer_address=link_local(mac))
        self.ep.send(encode(msg), server)

    def _received(self, data: bytes, addr: tuple) -> None:
        if self.ep.loss.drop_in():
            return
        try:
            msg = decode(data)
            inner = msg.get(Opt.RELAY_MSG) if msg.msg_type == MsgType.RELAY_REPL else None
            if inner is None or len(inner) < 4:
                self.stray += 1
                return
            xid = struct.unpack_from("!I", inner)[0] & 0xFFFFFF
        except Malformed6:
            self.stray += 1
            return
        box = self.waiting.get(xid)
        if box is None:
            self.stray += 1
            return
        box.datagram_received(inner, addr)

    def close(self) -> None:
        self.ep.close()


class Dhcp6Client:
    """SOLICIT/ADVERTISE/REQUEST/REPLY for one node, as UEFI firmware (`kind`: pxe|http)."""

    def __init__(self, relay: Dhcp6Relay, server: tuple[str, int], mac: bytes, kind: str,
                 tally: Tally):
        self.relay = relay
        self.server = server
        self.mac = mac
        self.arch, self.vendor_class = FIRMWARE[kind]
        self.duid = b"\x00\x04" + node_uuid(mac)  # DUID-UUID (RFC 6355), as OVMF sends
        self.iaid = int.from_bytes(mac[2:6], "big")
        self.tally = tally
        self.box = Endpoint(Loss(0.0))  # loss is applied once, by the relay socket

    def _message(self, mtype: int, xid: int, elapsed: float,
                 extra: list[tuple[int, bytes]]) -> bytes:
        opts = [(Opt.CLIENTID, self.duid),
                (Opt.ELAPSED_TIME, struct.pack("!H", min(0xFFFF, int(elapsed * 100)))),
                (Opt.ORO, struct.pack("!HH", Opt.BOOTFILE_URL, Opt.BOOTFILE_PARAM)),
                (Opt.CLIENT_ARCH, struct.pack("!H", self.arch)),
                (Opt.CLIENT_NII, b"\x01\x03\x00"),  # UNDI 3.0
                (Opt.VENDOR_CLASS, encode_vendor_class(IANA_ENTERPRISE, [self.vendor_class])),
                *extra]
        return encode(Message(mtype, xid, opts))

    async def _await(self, xid: int, want: int, timeout: float) -> Message | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            got = await self.box.recv(left)
            if got is None:
                return None
            try:
                msg = decode(got[0])
            except Malformed6:
                continue
            if msg.xid == xid and msg.msg_type == want and msg.get(Opt.CLIENTID) == self.duid:
                return msg
        return None

    async def _exchange(self, mtype: int, want: int, timeouts: tuple[float, ...],
                        t0: float, extra: list[tuple[int, bytes]]) -> Message | None:
        loop = asyncio.get_running_loop()
        xid = self.relay.xid()
        self.relay.waiting[xid] = self.box
        try:
            for i, timeout in enumerate(timeouts):
                if i:
                    self.tally.retry("dhcp6")
                self.tally.requests["dhcp6"] += 1
                self.relay.forward(self._message(mtype, xid, loop.time() - t0, extra),
                                   self.mac, self.server)
                got = await self._await(xid, want, timeout * random.uniform(0.9, 1.1))
                if got is not None:
                    return got
            return None
        finally:
            self.relay.waiting.pop(xid, None)

    async def boot(self) -> tuple[str, str]:
        """(the address granted, the boot file URL).  Raises ProtocolFailure when the
        firmware gives up (no ADVERTISE, or no REPLY granting an address)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ia = [(Opt.IA_NA, encode_ia_na(IaNa(self.iaid, 0, 0)))]
        adv = await self._exchange(MsgType.SOLICIT, MsgType.ADVERTISE, SOLICIT_TIMEOUTS, t0, ia)
        if adv is None:
            raise ProtocolFailure(f"dhcp6: no ADVERTISE after {len(SOLICIT_TIMEOUTS)} "
                                  "SOLICITs")
        offered = _address(adv)
        sid = adv.get(Opt.SERVERID)
        if offered is None or sid is None:
            raise ProtocolFailure(f"dhcp6: ADVERTISE without an address ({_why(adv)})")
        want = [(Opt.SERVERID, sid), (Opt.IA_NA, encode_ia_na(IaNa(self.iaid, 0, 0, [
            (Opt.IAADDR, encode_iaaddr(IaAddr(ipaddress.IPv6Address(offered).packed, 0, 0)))])))]
        reply = await self._exchange(MsgType.REQUEST, MsgType.REPLY, REQUEST_TIMEOUTS, t0, want)
        if reply is None:
            raise ProtocolFailure(f"dhcp6: no REPLY after {len(REQUEST_TIMEOUTS)} REQUESTs")
        got = _address(reply)
        url = reply.get(Opt.BOOTFILE_URL)
        if got is None or url is None:
            raise ProtocolFailure(f"dhcp6: REPLY without an address or boot URL ({_why(reply)})")
        self.tally.took("dhcp6", loop.time() - t0)
        return got, url.decode("utf-8", "replace")


def _address(msg: Message) -> str | None:
    """The first address of the message's IA_NA (None: none, or a status other than 0)."""
    for raw in msg.all(Opt.IA_NA):
        try:
            ia = decode_ia_na(raw)
        except Malformed6:
            continue
        st = next((v for c, v in ia.options if c == Opt.STATUS_CODE), None)
        if st is not None and decode_status(st)[0] != 0:
            continue
        for a in ia.addresses():
            return str(ipaddress.IPv6Address(a.address))
    return None


def _why(msg: Message) -> str:
    for raw in [msg.get(Opt.STATUS_CODE)] + [
            v for r in msg.all(Opt.IA_NA) for c, v in _ia_options(r) if c == Opt.STATUS_CODE]:
        if raw is not None:
            code, text = decode_status(raw)
            return f"status {code} {text}".strip()
    return "no status"


def _ia_options(raw: bytes) -> list[tuple[int, bytes]]:
    try:
        return decode_ia_na(raw).options
    except Malformed6:
        return []


def boot_target(url: str, tftp_port: int, http_port: int) -> tuple[str, tuple[str, int], str]:
    """(scheme, (host, port), path) of a boot file URL: tftp://[addr]/file or
    http://[addr]:port/path; a URL without a port takes the given one (TFTP's 69 is a
    high port when the server runs as a test's)."""
    u = urlsplit(url)
    if u.scheme not in ("tftp", "http") or not u.hostname:
        raise ProtocolFailure(f"dhcp6: boot URL {url!r} is neither tftp:// nor http://")
    port = u.port or (tftp_port if u.scheme == "tftp" else http_port)
    try:  # one spelling of the address: TFTP checks where its answers come from
        host = str(ipaddress.ip_address(u.hostname))
    except ValueError:
        host = u.hostname
    path = u.path or "/"
    if u.query:
        path += "?" + u.query
    return u.scheme, (host, port), path
