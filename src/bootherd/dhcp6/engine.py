"""Sans-IO DHCPv6 server logic (RFC 8415, boot options of RFC 5970): one message in, at
most one Decision out.

No sockets, no clock (``now`` is an input), no database.  A client is an inventory node
when its MAC (RFC 6939 option 79 from a relay, its DUID-LL/LLT, or the EUI-64 link-local
address it speaks from) is a node's control MAC and that interface has an IPv6 address
(`interfaces.ip6`); it then always gets that address.  Other clients get addresses from
`dhcp6.pool` when `dhcp6.unknown_clients = "pool"`.  Boot clients (vendor class
PXEClient / HTTPClient with option 61, or iPXE's user class) get the boot file URL
(option 59) of their architecture's loader slot, or are refused (bootherd.firmware)
exactly as over DHCPv4.

Leases share `dhcp.leases.LeaseTable` and the v4 Decision: the transport commits the
lease row before it sends a REPLY that grants an address.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..dhcp.engine import Decision
from ..dhcp.leases import BOUND, DECLINED, OFFERED, RELEASED, LeaseTable
from ..firmware import Firmware, loader_slot, refusal
from ..inventory.model import Node, Snapshot
from .codec import (
    CLIENT_PORT,
    SERVER_PORT,
    IaAddr,
    IaNa,
    MalformedPacket,
    Message,
    MsgType,
    Opt,
    Status,
    classify_client,
    client_mac,
    decode,
    decode_ia_na,
    encode,
    encode_ia_na,
    encode_iaaddr,
    encode_vendor_class,
    status,
)

OFFER_HOLD = 60.0
DECLINE_HOLD = 3600.0
MAX_HOPS = 32  # RFC 8415 HOP_COUNT_LIMIT
REFUSAL_LOG_INTERVAL = 60.0
IANA_ENTERPRISE = 343  # Intel's enterprise number, which PXE and HTTP boot classes carry

# (snapshot, node or None, loader slot) -> boot file URL, or None to refuse the client.
# `bootherd serve` passes policy.dhcp6_boot.
BootUrl = Callable[[Snapshot, Node | None, str], "str | None"]


_AF6 = socket.AF_INET6
_pton, _ntop = socket.inet_pton, socket.inet_ntop  # C, RFC 5952 text like ipaddress's


def _addr_int(text: str) -> int:
    return int.from_bytes(_pton(_AF6, text), "big")


def _addr_text(n: int) -> str:
    return _ntop(_AF6, n.to_bytes(16, "big"))


def server_duid(name: str) -> bytes:
    """DUID-UUID (RFC 6355) from the server's name: stable across restarts."""
    return b"\x00\x04" + uuid.uuid5(uuid.NAMESPACE_DNS, f"{name}.dhcp6.bootherd").bytes


@dataclass(frozen=True, slots=True)
class Settings6:
    duid: bytes
    lease_time: int = 86400
    dynamic_lease_time: int = 600
    unknown_clients: str = "ignore"  # or "pool"
    pool: tuple[int, int] | None = None
    dns_servers: tuple[str, ...] = ()
    preference: int = 255  # an ADVERTISE with 255 is taken at once (RFC 8415 18.2.1)
    rapid_commit: bool = True
    server_name: str = ""

    @classmethod
    def from_config(cls, cfg: Any, server_name: str = "") -> Settings6:
        d = cfg.dhcp6
        pool = None
        if d.pool:
            a, b = (_addr_int(x.strip()) for x in d.pool.split("-"))
            pool = (min(a, b), max(a, b))
        return cls(server_duid(server_name or "bootherd"), d.lease_time, d.dynamic_lease_time,
                   d.unknown_clients, pool, tuple(d.dns_servers), d.preference,
                   d.rapid_commit, server_name)


def _client_key(duid: bytes, iaid: int) -> str:
    return f"{duid.hex()}/{iaid:08x}"


def _row_mac(mac: bytes | None, key: str) -> str:
    """The leases.mac column: the client's MAC where it is known, else a 17-character tag of
    its DUID and IAID (never a MAC), so two servers' claims still tell clients apart."""
    if mac is not None:
        return mac.hex(":")
    return "~" + hashlib.sha1(key.encode()).hexdigest()[:16]


@dataclass
class Engine6:
    """The DHCPv6 server's decisions.  ``handle`` never raises for any input bytes."""

    settings: Settings6
    boot_url: BootUrl
    leases: LeaseTable = field(default_factory=LeaseTable)
    counters: Counter = field(default_factory=Counter)
    pool_grants: bool = True  # False while the lease database is away

    def __post_init__(self) -> None:
        self._dns = b"".join(ipaddress.IPv6Address(a).packed for a in self.settings.dns_servers)
        self._cursor = self.settings.pool[0] if self.settings.pool else 0
        self._exhausted_at = -1e9
        self._refusal_logged: dict[bytes, float] = {}

    # ------------------------------------------------------------------ entry point

    def handle(self, data: bytes, src_ip: str, src_port: int, now: float,
               snap: Snapshot) -> Decision | None:
        c = self.counters
        try:
            msg = decode(data)
            relays: list[Message] = []
            while msg.msg_type == MsgType.RELAY_FORW:
                if len(relays) >= MAX_HOPS:
                    raise MalformedPacket("too many relay hops")
                inner = msg.get(Opt.RELAY_MSG)
                if inner is None:
                    raise MalformedPacket("relay-forward without a relay message")
                relays.append(msg)
                msg = decode(inner)
            if msg.relayed:
                c["dropped"] += 1
                return None
            peer = str(ipaddress.IPv6Address(relays[-1].peer_address)) if relays else src_ip
            relay_opts = relays[-1].options if relays else None
            reply = self._client(msg, peer, now, snap, relay_opts)
            if reply is None:
                return None
            if isinstance(reply, Decision):
                return reply  # a refusal (log line) or a lease to commit with no reply
            out, row, node_id = reply
            data_out = encode(out)
            if relays:
                for r in reversed(relays):
                    opts = [(Opt.RELAY_MSG, data_out)]
                    iface = r.get(Opt.INTERFACE_ID)
                    if iface is not None:
                        opts.insert(0, (Opt.INTERFACE_ID, iface))
                    data_out = encode(Message(MsgType.RELAY_REPL, 0, opts, r.hop_count,
                                              r.link_address, r.peer_address))
                return Decision(data_out, src_ip, SERVER_PORT, False, row, node_id)
            return Decision(data_out, src_ip, src_port or CLIENT_PORT, False, row, node_id)
        except MalformedPacket:
            c["malformed"] += 1
            return None

    # ------------------------------------------------------------------ client messages

    def _client(self, msg: Message, peer: str, now: float, snap: Snapshot,
                relay_opts: Any) -> Any:
        c = self.counters
        mt = msg.msg_type
        name = {1: "solicit", 3: "request", 4: "confirm", 5: "renew", 6: "rebind",
                8: "release", 9: "decline", 11: "information_request"}.get(mt)
        if name is None:
            c["unexpected_type"] += 1
            return None
        c[name] += 1
        duid = msg.get(Opt.CLIENTID)
        sid = msg.get(Opt.SERVERID)
        if mt == MsgType.INFORMATION_REQUEST:
            if sid is not None and sid != self.settings.duid:
                c["other_server"] += 1
                return None
        elif duid is None or not 2 < len(duid) <= 130:
            raise MalformedPacket("no or bad client identifier")
        if mt in (MsgType.SOLICIT, MsgType.CONFIRM, MsgType.REBIND):
            if sid is not None:
                raise MalformedPacket("server identifier where none is allowed")
        elif mt in (MsgType.REQUEST, MsgType.RENEW, MsgType.RELEASE, MsgType.DECLINE):
            if sid != self.settings.duid:
                c["other_server"] += 1
                if mt == MsgType.REQUEST:
                    # The client chose another server: free what we advertised it.
                    for ia in self._ias(msg):
                        self.leases.drop_offer(_client_key(duid or b"", ia.iaid))
                return None
        mac = client_mac(msg, peer, relay_opts)
        node = snap.by_mac.get(mac.hex(":")) if mac is not None else None
        if node is not None and (node.control_mac != mac.hex(":") or not node.control_ip6):
            node = None
        fw = classify_client(msg)
        boot: list[tuple[int, bytes]] = []
        if fw is not Firmware.OTHER:
            url = None if fw is Firmware.UNKNOWN else self.boot_url(snap, node, loader_slot(fw))
            if url is None:
                return self._refuse(msg, fw, node, mac, now)
            boot.append((Opt.BOOTFILE_URL, url.encode()))
            if fw.http:
                boot.append((Opt.VENDOR_CLASS, encode_vendor_class(IANA_ENTERPRISE,
                                                                   [b"HTTPClient"])))
        if mt == MsgType.INFORMATION_REQUEST:
            return self._reply(msg, MsgType.REPLY, [], boot), None, None
        if node is None and (self.settings.unknown_clients != "pool" or not self.settings.pool):
            c["ignored"] += 1
            return None
        if mt == MsgType.SOLICIT:
            return self._solicit(msg, duid, mac, node, boot, now, snap)
        if mt in (MsgType.REQUEST, MsgType.RENEW, MsgType.REBIND):
            return self._grant_all(msg, duid, mac, node, boot, now, snap, MsgType.REPLY,
                                   commit=True, rebind=mt == MsgType.REBIND)
        if mt == MsgType.CONFIRM:
            return self._confirm(msg, duid, node, now)
        return self._release_or_decline(msg, duid, mac, node, now,
                                        DECLINED if mt == MsgType.DECLINE else RELEASED)

    def _ias(self, msg: Message) -> list[IaNa]:
        return [decode_ia_na(v) for c, v in msg.options if c == Opt.IA_NA]

    def _refuse(self, msg: Message, fw: Firmware, node: Node | None, mac: bytes | None,
                now: float) -> Decision | None:
        self.counters["refused_arch"] += 1
        key = mac or msg.get(Opt.CLIENTID) or b""
        last = self._refusal_logged.get(key)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            return None
        if len(self._refusal_logged) > 10_000:
            self._refusal_logged.clear()
        self._refusal_logged[key] = now
        who = f"{node.node_id if node else 'unknown client'} " \
              f"({mac.hex(':') if mac else 'no MAC'})"
        raw = msg.get(Opt.CLIENT_ARCH)
        arch = None
        if raw is not None and len(raw) >= 2:
            arch = raw[0] << 8 | raw[1]
        return Decision(b"", "", 0, log=refusal(fw, who, arch).replace("no offer",
                                                                       "no advertise"))

    # ------------------------------------------------------------------ addresses

    def _address(self, key: str, node: Node | None, snap: Snapshot, now: float,
                 wanted: list[str]) -> str | None:
        if node is not None:
            return node.control_ip6
        pool = self.settings.pool
        assert pool is not None
        first, last = pool
        mine = self.leases.of_mac(key)
        if mine is not None and self.leases.free_for(mine.ip, key, now) \
                and first <= _addr_int(mine.ip) <= last:
            return mine.ip
        for w in wanted:
            n = _addr_int(w)
            if first <= n <= last and w not in snap.by_ip and self.leases.free_for(w, key, now):
                return w
        if now - self._exhausted_at < 1.0:
            return None
        size = min(last - first + 1, 1 << 20)
        by_ip, inventory = self.leases.by_ip, snap.by_ip
        for allow_expired in (False, True):
            cur = self._cursor
            for _ in range(size):
                ip = _addr_text(cur)
                cur = cur + 1 if cur < last else first
                if ip in inventory:
                    continue
                held = by_ip.get(ip)
                if held is None or allow_expired and not held.active(now):
                    self._cursor = cur
                    return ip
        self._exhausted_at = now
        return None

    def _lifetimes(self, node: Node | None) -> tuple[int, int, int, int]:
        """(T1, T2, preferred, valid) for an inventory node or a pool client."""
        valid = self.settings.lease_time if node is not None else self.settings.dynamic_lease_time
        return valid // 2, valid * 4 // 5, valid, valid

    def _reply(self, msg: Message, mt: int, ias: list[tuple[int, bytes]],
               boot: list[tuple[int, bytes]], extra: list[tuple[int, bytes]] = ()) -> Message:
        opts: list[tuple[int, bytes]] = [(Opt.SERVERID, self.settings.duid)]
        duid = msg.get(Opt.CLIENTID)
        if duid is not None:
            opts.insert(0, (Opt.CLIENTID, duid))
        opts += ias
        opts += list(extra)
        if mt == MsgType.ADVERTISE and self.settings.preference:
            opts.append((Opt.PREFERENCE, bytes([self.settings.preference])))
        if self._dns:
            opts.append((Opt.DNS_SERVERS, self._dns))
        # Boot options go to every boot client, listed in its ORO (6) or not.
        opts += boot
        return Message(mt, msg.xid, opts)

    def _solicit(self, msg: Message, duid: bytes, mac: bytes | None, node: Node | None,
                 boot: list[tuple[int, bytes]], now: float, snap: Snapshot) -> Any:
        rapid = self.settings.rapid_commit and msg.get(Opt.RAPID_COMMIT) is not None
        if rapid:
            return self._grant_all(msg, duid, mac, node, boot, now, snap, MsgType.REPLY,
                                   commit=True, rapid=True)
        return self._grant_all(msg, duid, mac, node, boot, now, snap, MsgType.ADVERTISE,
                               commit=False)

    def _grant_all(self, msg: Message, duid: bytes, mac: bytes | None, node: Node | None,
                   boot: list[tuple[int, bytes]], now: float, snap: Snapshot, mt: int,
                   commit: bool, rapid: bool = False, rebind: bool = False) -> Any:
        c = self.counters
        ias = self._ias(msg)
        out: list[tuple[int, bytes]] = []
        row = None
        t1, t2, preferred, valid = self._lifetimes(node)
        for n, ia in enumerate(ias):
            if n:  # one address per client: the lease row is one per reply
                out.append((Opt.IA_NA, encode_ia_na(IaNa(ia.iaid, 0, 0, [
                    (Opt.STATUS_CODE, status(Status.NO_ADDRS_AVAIL, "one address per client"))]))))
                continue
            key = _client_key(duid, ia.iaid)
            wanted = [_ntop(_AF6, a.address) for a in ia.addresses()]
            if node is None and commit and not self.pool_grants:
                c["pool_no_db"] += 1
                return None
            if rebind and node is None and self.leases.of_mac(key) is None:
                c["no_record"] += 1
                return None  # RFC 8415 18.3.5: no binding, stay silent
            ip = self._address(key, node, snap, now, wanted)
            if ip is None:
                c["pool_exhausted"] += 1
                out.append((Opt.IA_NA, encode_ia_na(IaNa(ia.iaid, 0, 0, [
                    (Opt.STATUS_CODE, status(Status.NO_ADDRS_AVAIL, "no addresses"))]))))
                continue
            sub = [(Opt.IAADDR, encode_iaaddr(IaAddr(_pton(_AF6, ip), preferred, valid)))]
            # Addresses the client asked for and cannot have: lifetimes 0 (RFC 8415 18.3.4).
            for w in wanted:
                if w != ip:
                    sub.append((Opt.IAADDR, encode_iaaddr(IaAddr(_pton(_AF6, w), 0, 0))))
            out.append((Opt.IA_NA, encode_ia_na(IaNa(ia.iaid, t1, t2, sub))))
            state = BOUND if commit else OFFERED
            expires = now + (valid if commit else OFFER_HOLD)
            if node is None or commit:
                cur = self.leases.get(ip)
                if commit or cur is None or cur.mac != key or cur.state != BOUND:
                    self.leases.put(ip, key, state, expires, node.node_id if node else None, key)
            if commit and row is None:
                row = self._row(ip, key, mac, state, expires, node, now)
        if not ias:
            c["no_ia"] += 1
        extra = [(Opt.RAPID_COMMIT, b"")] if rapid else []
        reply = self._reply(msg, mt, out, boot, extra)
        c["advertise" if mt == MsgType.ADVERTISE else "reply"] += 1
        return reply, row, node.node_id if node is not None and commit else None

    def _row(self, ip: str, key: str, mac: bytes | None, state: str, expires: float,
             node: Node | None, now: float) -> dict[str, Any]:
        return {"ip": ip, "mac": _row_mac(mac, key), "client_id": key,
                "node_id": node.node_id if node else None, "state": state, "expires": expires,
                "updated": now, "server": self.settings.server_name}

    def _confirm(self, msg: Message, duid: bytes, node: Node | None, now: float) -> Any:
        """Success when every address the client holds is on our link (its inventory
        address, or one in the pool), NotOnLink otherwise."""
        pool = self.settings.pool
        ok = True
        seen = False
        for ia in self._ias(msg):
            for a in ia.addresses():
                seen = True
                text = str(ipaddress.IPv6Address(a.address))
                mine = node is not None and text == node.control_ip6
                in_pool = pool is not None and pool[0] <= _addr_int(text) <= pool[1]
                ok = ok and (mine or in_pool)
        if not seen:
            return None  # nothing to confirm: RFC 8415 18.3.3 says stay silent
        code = Status.SUCCESS if ok else Status.NOT_ON_LINK
        self.counters["reply"] += 1
        return self._reply(msg, MsgType.REPLY, [], [], [
            (Opt.STATUS_CODE, status(code, "all on link" if ok else "not on link"))]), None, None

    def _release_or_decline(self, msg: Message, duid: bytes, mac: bytes | None,
                            node: Node | None, now: float, state: str) -> Any:
        row = None
        for ia in self._ias(msg):
            key = _client_key(duid, ia.iaid)
            for a in ia.addresses():
                ip = str(ipaddress.IPv6Address(a.address))
                lease = self.leases.get(ip)
                if lease is None or lease.mac != key:
                    continue
                expires = now + DECLINE_HOLD if state == DECLINED else now
                self.leases.put(ip, key, state, expires, lease.node_id, key)
                row = self._row(ip, key, mac, state, expires, node, now)
        self.counters["reply"] += 1
        reply = self._reply(msg, MsgType.REPLY, [], [], [
            (Opt.STATUS_CODE, status(Status.SUCCESS, state))])
        return reply, row, None

    def lost_claim(self, row: dict[str, Any]) -> None:
        """Another server holds the pool address we tried to grant: forget our binding."""
        self.leases.forget(row["ip"], row["client_id"])
        self.counters["lost_claims"] += 1


__all__ = ["Engine6", "Settings6", "server_duid"]
