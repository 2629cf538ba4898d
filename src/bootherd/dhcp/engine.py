"""Sans-IO DHCP/PXE server logic: one request in, at most one reply decision out.

No sockets, no clock (``now`` is an input), no database: leases live in a
:class:`~bootherd.dhcp.leases.LeaseTable` and the decision names the row the transport must
commit before it sends the reply.  RFC 2131 section 4.3 drives the branches; PXE 2.1,
RFC 4578 and iPXE's conventions drive the boot options.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..firmware import HTTP_BOOT, Firmware, loader_slot, refusal
from ..inventory.model import Node, Snapshot
from .codec import (
    BROADCAST_FLAG,
    DhcpMessage,
    EncodeError,
    MalformedPacket,
    classify_client,
    decode,
    encode_ipxe_encap,
    encode_pxe_vendor,
    encode_reply,
    make_reply,
)
from .leases import BOUND, DECLINED, OFFERED, RELEASED, Lease, LeaseTable, lease_row

ZERO = b"\x00\x00\x00\x00"
BROADCAST = "255.255.255.255"
BOOTP_LEASE = 10 * 365 * 86400.0  # BOOTP clients never renew: a lease as good as permanent
OFFER_HOLD = 60.0  # seconds an offered pool address is kept for the client
DECLINE_HOLD = 3600.0  # seconds a declined address stays out of the pool

REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines about one refused client

# What a client boots: (snapshot, node or None for a pool client, loader slot, the
# address this server is reached at) -> (boot file, next-server), or None when no
# loader is configured for that slot (the client is refused).  `bootherd serve` passes
# policy.dhcp_boot.
BootFile = Callable[[Snapshot, Node | None, str, str], "tuple[str, str] | None"]


_HDR = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")  # the BOOTP header, as the codec packs it
_PAD = bytes(300)
_inet_aton = socket.inet_aton
_inet_ntoa = socket.inet_ntoa


def _ip_int(ip: str) -> int:
    return int.from_bytes(_inet_aton(ip), "big")


def _u32(v: float) -> bytes:
    return int(v).to_bytes(4, "big")


def _ip_list(values: list[str]) -> bytes:
    return b"".join(socket.inet_aton(v) for v in values)


@dataclass(frozen=True, slots=True)
class Settings:
    """What the engine needs from the configuration, resolved once."""

    server_ip: str  # server identifier (54); "": the address each request arrived on
    public_address: str  # advertised (siaddr, URLs, bootinfo); "": the arrival address
    mode: str = "authoritative"  # or "proxy"
    lease_time: int = 86400
    dynamic_lease_time: int = 600
    unknown_clients: str = "ignore"  # or "pool"
    pool: tuple[int, int] | None = None  # first, last as ints
    routers: tuple[str, ...] = ()
    dns_servers: tuple[str, ...] = ()
    domain: str = ""
    client_port: int = 68
    relay_port: int = 67
    server_name: str = ""

    @classmethod
    def from_config(cls, cfg: Any, server_name: str = "") -> Settings:
        d = cfg.dhcp
        public = cfg.server.public_address
        sid = d.address if d.address not in ("0.0.0.0", "") else ""
        pool = None
        if d.dynamic_pool:
            a, b = (int(ipaddress.IPv4Address(x.strip())) for x in d.dynamic_pool.split("-"))
            pool = (min(a, b), max(a, b))
        return cls(server_ip=sid, public_address=public, mode=d.mode, lease_time=d.lease_time,
                   dynamic_lease_time=d.dynamic_lease_time, unknown_clients=d.unknown_clients,
                   pool=pool, routers=tuple(d.routers), dns_servers=tuple(d.dns_servers),
                   domain=d.domain, client_port=d.client_port,
                   relay_port=d.relay_port, server_name=server_name)


@dataclass(slots=True)
class Decision:
    """What the transport does: send ``data`` to (ip, port), after committing ``lease``."""

    data: bytes
    ip: str
    port: int
    broadcast: bool = False
    lease: dict[str, Any] | None = None  # row to commit before sending (None: send at once)
    event_node: str | None = None  # the inventory node this ACK was for (the lifecycle hears it)
    log: str | None = None  # a line for the server log (a refused client), nothing to send


@dataclass(slots=True)
class Target:
    """Per (client, firmware, snapshot generation): everything a reply needs but the header."""

    node_id: str | None
    ip: str | None  # inventory address (None: pool client)
    mask: bytes
    file: bytes
    siaddr: bytes
    boot_opts: dict[int, bytes]  # 60 / 43 / 175 / 67 / 66 and static network options
    file_opt: bytes | None = None  # boot file too long for the header field
    # Encoded reply tails (cookie + options, no END) by (type, lease?, PRL, max size):
    # the hot path packs a header and appends one of these instead of encoding.
    tails: dict[tuple[Any, ...], bytes] = field(default_factory=dict)


@dataclass
class Engine:
    """The DHCP server's decisions.  ``handle`` never raises for any input bytes."""

    settings: Settings
    boot_file: BootFile
    leases: LeaseTable = field(default_factory=LeaseTable)
    counters: Counter = field(default_factory=Counter)
    # False while the lease database is away: pool addresses cannot be claimed there, so
    # none is offered or granted (inventory nodes keep being answered from memory).
    pool_grants: bool = True
    # Told (what, client MAC) about input that was counted and not fully answered; the
    # transport logs it at most once per interval per source.
    on_bad_input: Callable[[str, str], None] | None = None

    def __post_init__(self) -> None:
        st = self.settings
        # Per request (handle): the server identifier and the address advertised, from
        # the address the request arrived on unless the configuration fixes them.
        self.server_id = socket.inet_aton(st.server_ip) if st.server_ip else ZERO
        self._advertised = st.public_address or st.server_ip or "0.0.0.0"
        self._here: tuple[str, bytes] = (self._advertised, self.server_id)
        self._targets: dict[tuple[bytes, Firmware, tuple[str, bytes]], Target | None] = {}
        self._routers = [ipaddress.IPv4Address(r) for r in st.routers]
        # (MAC, or b"" for unknown clients, firmware) refused for want of a loader
        self._refused: set[tuple[bytes, Firmware]] = set()
        self._refusal_logged: dict[bytes, float] = {}
        self._refusing: DhcpMessage | None = None  # set by _lookup for handle() to report
        self._generation = -1
        self._cursor = st.pool[0] if st.pool else 0
        self._exhausted_at = -1e9
        self._static = {}
        if st.dns_servers:
            self._static[6] = _ip_list(list(st.dns_servers))
        if st.domain:
            self._static[15] = st.domain.encode()
        self._lease_opts = {
            True: {51: _u32(st.lease_time), 58: _u32(st.lease_time // 2),
                   59: _u32(st.lease_time * 7 // 8)},
            False: {51: _u32(st.dynamic_lease_time), 58: _u32(st.dynamic_lease_time // 2),
                    59: _u32(st.dynamic_lease_time * 7 // 8)},
        }
        self._pool_mask = b"\xff\xff\xff\x00"
        if st.pool:
            # Smallest network that holds the whole pool (the operator's subnet, usually).
            first, last = st.pool
            prefix = 32 - (first ^ last).bit_length()
            self._pool_mask = (0xFFFFFFFF << (32 - prefix) & 0xFFFFFFFF).to_bytes(4, "big")
            if prefix > 24:
                self._pool_mask = b"\xff\xff\xff\x00"

    # ------------------------------------------------------------------ targets

    def _target(self, snap: Snapshot, mac: bytes, fw: Firmware) -> Target | None:
        """The cached per-client reply material; None for a client we do not serve."""
        if snap.generation != self._generation:
            self._targets.clear()
            self._refused.clear()
            self._generation = snap.generation
        targets = self._targets
        here = self._here
        t = targets.get((mac, fw, here))
        if t is not None:
            return t
        node = snap.by_mac.get(mac.hex(":")) if len(mac) == 6 else None
        if node is None:
            # Unknown clients share one target per firmware (a storm of new MACs
            # must not build, or cache, anything per MAC).
            key = (b"", fw, here)
            if key not in targets:
                targets[key] = self._build_target(snap, None, mac, fw)
            return targets[key]
        t = self._build_target(snap, node, mac, fw)
        if len(targets) > 200_000:
            targets.clear()
        if t is not None:
            targets[(mac, fw, here)] = t
        return t

    def _routers_for(self, ip: str | None, mask: bytes) -> bytes | None:
        """Option 3: the configured routers on the client's own subnet (a router it
        cannot reach is no router; a node of another subnet must not get it)."""
        if not self._routers:
            return None
        if ip is None:  # a pool client: the pool's subnet
            assert self.settings.pool is not None
            ip = socket.inet_ntoa(self.settings.pool[0].to_bytes(4, "big"))
        net = ipaddress.IPv4Network(f"{ip}/{socket.inet_ntoa(mask)}", strict=False)
        mine = [r for r in self._routers if r in net]
        return b"".join(r.packed for r in mine) or None

    def _build_target(self, snap: Snapshot, node: Node | None, mac: bytes,
                      fw: Firmware) -> Target | None:
        ctrl = node.control if node is not None else None
        if node is None or ctrl is None or ctrl.mac != mac.hex(":") or not ctrl.ip:
            node = None
            if self.settings.unknown_clients != "pool" or not self.settings.pool:
                return None
        public = self._advertised
        boot = None if fw is Firmware.UNKNOWN else \
            self.boot_file(snap, node, loader_slot(fw), public)
        if boot is None:
            # Never another architecture's binary: no offer at all (handle() logs it).
            self._refused.add((mac if node is not None else b"", fw))
            return None
        filename, next_server = boot
        fb = filename.encode()
        opts: dict[int, bytes] = dict(self._static)
        if node is not None:
            opts[12] = node.node_id.encode()
        if fw in HTTP_BOOT:
            opts[60] = b"HTTPClient"
        elif fw is not Firmware.OTHER:  # PXE ROMs and iPXE
            opts[60] = b"PXEClient"
            opts[43] = encode_pxe_vendor(discovery_control=8, bootinfo_server=public)
        if fw is Firmware.IPXE:
            opts[175] = encode_ipxe_encap(no_pxedhcp=True)
        file_opt = None
        if fb and len(fb) > 127:
            file_opt, fb = fb, b""
        if next_server:
            opts[66] = next_server.encode()
        if fb or file_opt:
            opts[67] = file_opt or fb
        if node is not None:
            assert ctrl is not None and ctrl.ip
            mask = socket.inet_aton(ctrl.mask) if ctrl.mask else b"\xff\xff\xff\x00"
            routers = self._routers_for(ctrl.ip, mask)
            if routers:
                opts[3] = routers
            return Target(node.node_id, ctrl.ip, mask, fb,
                          socket.inet_aton(next_server) if next_server else ZERO, opts, file_opt)
        routers = self._routers_for(None, self._pool_mask)
        if routers:
            opts[3] = routers
        return Target(None, None, self._pool_mask, fb,
                      socket.inet_aton(next_server) if next_server else ZERO, opts, file_opt)

    # ------------------------------------------------------------------ pool

    def _allocate(self, mac: str, snap: Snapshot, now: float,
                  wanted: str | None = None) -> str | None:
        """An address from the dynamic pool for an unknown client (sticky per MAC)."""
        pool = self.settings.pool
        if not pool:
            return None
        leases = self.leases
        first, last = pool
        mine = leases.of_mac(mac)
        if mine is not None and leases.free_for(mine.ip, mac, now) \
                and first <= _ip_int(mine.ip) <= last:
            return mine.ip
        if wanted is not None:
            w = _ip_int(wanted)
            if first <= w <= last and wanted not in snap.by_ip \
                    and wanted != self._here_ip() and leases.free_for(wanted, mac, now):
                return wanted
        if now - self._exhausted_at < 1.0:
            return None  # a full pool: do not rescan it for every packet of a storm
        size = last - first + 1
        by_ip, by_ip_inv = leases.by_ip, snap.by_ip
        own = self._here_ip()
        # Two passes from the cursor: never-used addresses first, then expired ones.
        for allow_expired in (False, True):
            cur = self._cursor
            for _ in range(size):
                ip = socket.inet_ntoa(cur.to_bytes(4, "big"))
                cur = cur + 1 if cur < last else first
                if ip in by_ip_inv or ip == own:
                    continue
                held = by_ip.get(ip)
                if held is None or allow_expired and not held.active(now):
                    self._cursor = cur
                    return ip
        self._exhausted_at = now
        return None

    # ------------------------------------------------------------------ entry point

    def _here_ip(self) -> str:
        return socket.inet_ntoa(self.server_id)

    def handle(self, data: bytes, src_ip: str, src_port: int, now: float, snap: Snapshot,
               proxy_port: bool = False, local_ip: str = "") -> Decision | None:
        """Decide the reply to one datagram.  `local_ip` is the address it arrived on
        (IP_PKTINFO on a wildcard socket): the server identifier and what the reply
        advertises unless dhcp.address / server.public_address fix them."""
        st = self.settings
        if local_ip and not (st.server_ip and st.public_address):
            sid = self.server_id if st.server_ip else _inet_aton(local_ip)
            adv = st.public_address or st.server_ip or local_ip
            if self._here[0] != adv or self._here[1] != sid:
                self.server_id, self._advertised = sid, adv
                self._here = (adv, sid)
        self._refusing = None
        d = self._handle(data, src_ip, src_port, now, snap, proxy_port)
        if d is None and self._refusing is not None:
            return self._refusal(self._refusing, snap, now)
        return d

    def _refusal(self, msg: DhcpMessage, snap: Snapshot, now: float) -> Decision | None:
        """A refused client: counted, and a log line at most every REFUSAL_LOG_INTERVAL."""
        self.counters["refused_arch"] += 1
        mac = msg.mac
        last = self._refusal_logged.get(mac)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            return None
        if len(self._refusal_logged) > 10_000:
            self._refusal_logged.clear()
        self._refusal_logged[mac] = now
        node = snap.by_mac.get(mac.hex(":")) if len(mac) == 6 else None
        who = f"{node.node_id if node else 'unknown client'} ({mac.hex(':')})"
        raw = msg.options.get(93)
        arch = (raw[0] << 8 | raw[1]) if raw is not None and len(raw) >= 2 else None
        return Decision(b"", "", 0, log=refusal(classify_client(msg), who, arch))

    def _handle(self, data: bytes, src_ip: str, src_port: int, now: float, snap: Snapshot,
                proxy_port: bool) -> Decision | None:
        c = self.counters
        try:
            msg = decode(data)
            if msg.op != 1 or msg.hlen == 0:
                c["dropped"] += 1
                return None
            mt_raw = msg.options.get(53)
            if mt_raw is None:
                if self.settings.mode == "proxy" or proxy_port:
                    c["dropped"] += 1
                    return None
                c["bootp"] += 1
                return self._bootp(msg, snap, now, src_ip, src_port)
            if len(mt_raw) != 1:
                raise MalformedPacket("message type length")
            mt = mt_raw[0]
            if self.settings.mode == "proxy" or proxy_port:
                return self._proxy(msg, mt, snap, src_ip, src_port, proxy_port, now)
            if mt == 1:
                c["discover"] += 1
                return self._discover(msg, snap, now, src_ip, src_port)
            if mt == 3:
                c["request"] += 1
                return self._request(msg, snap, now, src_ip, src_port)
            if mt == 7:
                c["release"] += 1
                return self._release(msg, snap, now)
            if mt == 4:
                c["decline"] += 1
                return self._decline(msg, snap, now)
            if mt == 8:
                c["inform"] += 1
                return self._inform(msg, snap, now, src_ip, src_port)
            c["unexpected_type"] += 1
            return None
        except MalformedPacket:
            c["malformed"] += 1
            self.bad_input("malformed")
            return None

    # ------------------------------------------------------------------ helpers

    def _dest(self, msg: DhcpMessage, src_ip: str, src_port: int,
              nak: bool = False) -> tuple[str, int, bool]:
        """RFC 2131 4.1: where a reply goes."""
        if msg.giaddr != ZERO:
            return socket.inet_ntoa(msg.giaddr), self.settings.relay_port, False
        if nak and src_ip != "0.0.0.0":
            return src_ip, src_port, False  # it still holds the address it spoke from
        if not nak and msg.ciaddr != ZERO:
            return socket.inet_ntoa(msg.ciaddr), self.settings.client_port, False
        if nak or msg.flags & BROADCAST_FLAG or src_ip == "0.0.0.0":
            return BROADCAST, self.settings.client_port, True
        # A client that already has a source address but named none (test tools, some
        # loaders): answer where it spoke from.
        return src_ip, src_port, False

    def _event(self, node_id: str | None, now: float) -> str | None:
        # Reported on every ACK; the lifecycle coordinator decides which become events.
        return node_id

    def _reply(self, msg: DhcpMessage, mt: int, t: Target, yiaddr: bytes, lease: bool,
               known: bool, src_ip: str, src_port: int) -> bytes:
        ropts = msg.options
        key = (mt, lease, ropts.get(55), ropts.get(57))
        tail = t.tails.get(key)
        if tail is None:
            tail = self._tail(msg, mt, t, yiaddr, lease, known)
            if len(t.tails) < 64:
                t.tails[key] = tail
        if tail:
            head = _HDR.pack(2, msg.htype, msg.hlen, 0, msg.xid, 0, msg.flags,
                             msg.ciaddr if mt == 5 else ZERO, yiaddr, t.siaddr, msg.giaddr,
                             msg.chaddr, b"", t.file)
            rai = ropts.get(82)
            if rai is None:
                out = head + tail + b"\xff"
            elif len(rai) < 256:
                out = b"".join((head, tail, bytes((82, len(rai))), rai, b"\xff"))
            else:
                out = b""
            if out:
                n = len(out)
                if n < 300:
                    return out + _PAD[n:]
                mms = ropts.get(57)
                limit = (mms[0] << 8 | mms[1]) if mms is not None and len(mms) == 2 else 576
                if n <= (limit if limit > 576 else 576) - 28:
                    return out
        return self._slow_reply(msg, mt, t, yiaddr, lease, known)

    def _tail(self, msg: DhcpMessage, mt: int, t: Target, yiaddr: bytes, lease: bool,
              known: bool) -> bytes:
        """The cacheable part of a reply, or b"" if this reply needs the codec's slow path."""
        full = self._slow_reply(msg, mt, t, yiaddr, lease, known, with_rai=False)
        if full[44:108] != bytes(64) or full[108:236] != t.file.ljust(128, b"\0"):
            return b""  # options overflowed into sname/file: not a fixed tail
        tail = full[236:].rstrip(b"\0")
        if not tail.endswith(b"\xff"):
            return b""
        return tail[:-1]

    def _slow_reply(self, msg: DhcpMessage, mt: int, t: Target, yiaddr: bytes, lease: bool,
                    known: bool, with_rai: bool = True) -> bytes:
        opts = dict(t.boot_opts)
        opts[1] = t.mask
        if lease:
            opts.update(self._lease_opts[known])
        reply = make_reply(msg, mt, yiaddr=yiaddr, siaddr=t.siaddr, server_id=self.server_id,
                           file=t.file, options=opts)
        if not with_rai:
            reply.options.pop(82, None)
        return self._encode(reply, msg)

    def _encode(self, reply: DhcpMessage, msg: DhcpMessage) -> bytes:
        try:
            return encode_reply(reply, msg)
        except EncodeError:
            if 82 not in reply.options:
                raise
        # The relay's option 82 cannot be echoed within the client's message size (a
        # relay or a forger sent hundreds of bytes of it): answer without the echo.
        del reply.options[82]
        self.counters["relay_info_dropped"] += 1
        self.bad_input("relay_info_dropped", msg)
        return encode_reply(reply, msg)

    def bad_input(self, what: str, msg: DhcpMessage | None = None) -> None:
        """Report bad input to the transport (it logs, rate-limited); counted by the caller."""
        if self.on_bad_input is not None:
            self.on_bad_input(what, msg.mac.hex(":") if msg is not None else "")

    def _nak(self, msg: DhcpMessage, src_ip: str, src_port: int, why: bytes) -> Decision:
        self.counters["nak"] += 1
        reply = make_reply(msg, 6, server_id=self.server_id, options={56: why})
        if msg.giaddr != ZERO:
            reply.flags |= BROADCAST_FLAG  # RFC 2131 4.3.2: the relay broadcasts it
        ip, port, bcast = self._dest(msg, src_ip, src_port, nak=True)
        return Decision(self._encode(reply, msg), ip, port, bcast)

    def _lookup(self, msg: DhcpMessage, snap: Snapshot) -> tuple[Target | None, Firmware]:
        fw = classify_client(msg)
        t = self._target(snap, msg.mac, fw)
        if t is None and self._refused and ((msg.mac, fw) in self._refused
                                            or (b"", fw) in self._refused):
            self._refusing = msg
        return t, fw

    def _address_for(self, t: Target, mac: str, snap: Snapshot, now: float,
                     wanted: str | None = None) -> str | None:
        if t.ip is not None:
            return t.ip
        return self._allocate(mac, snap, now, wanted)

    # ------------------------------------------------------------------ messages

    def _discover(self, msg: DhcpMessage, snap: Snapshot, now: float, src_ip: str,
                  src_port: int) -> Decision | None:
        t, _ = self._lookup(msg, snap)
        if t is None:
            self.counters["ignored"] += 1
            return None
        mac = msg.mac.hex(":")
        wanted = msg.options.get(50)
        ip = self._address_for(t, mac, snap, now,
                               socket.inet_ntoa(wanted) if wanted and len(wanted) == 4 else None)
        if ip is None:
            self.counters["pool_exhausted"] += 1
            return None
        if t.ip is None:
            if not self.pool_grants:
                self.counters["pool_no_db"] += 1
                return None
            cur = self.leases.get(ip)
            if cur is None or cur.mac != mac or cur.state != BOUND or cur.expires <= now:
                self.leases.put(ip, mac, OFFERED, now + OFFER_HOLD)
        dip, port, bcast = self._dest(msg, src_ip, src_port)
        data = self._reply(msg, 2, t, socket.inet_aton(ip), True, t.ip is not None,
                           src_ip, src_port)
        self.counters["offer"] += 1
        # No state event for an offer: with several servers every one of them offers, and
        # a late duplicate DISCOVER must not record PXEBOOTING after the node moved on.
        # The ACK (from the server the client chose) records it.
        return Decision(data, dip, port, bcast, None, None)

    def _grant(self, msg: DhcpMessage, t: Target, ip: str, now: float, src_ip: str,
               src_port: int, bootp: bool = False) -> Decision | None:
        mac = msg.mac.hex(":")
        known = t.ip is not None
        if not known and not self.pool_grants:
            self.counters["pool_no_db"] += 1
            return None
        duration = BOOTP_LEASE if bootp else \
            self.settings.lease_time if known else self.settings.dynamic_lease_time
        cid = msg.options.get(61)
        lease = self.leases.put(ip, mac, BOUND, now + duration, t.node_id,
                                cid.hex() if cid else "")
        row = lease_row(lease, now, self.settings.server_name)
        dip, port, bcast = self._dest(msg, src_ip, src_port)
        if bootp:
            opts = dict(t.boot_opts)
            opts[1] = t.mask
            for k in (60, 43, 175):
                opts.pop(k, None)
            reply = make_reply(msg, 2, yiaddr=socket.inet_aton(ip), siaddr=t.siaddr,
                               file=t.file, options=opts)
            del reply.options[53]
            data = self._encode(reply, msg)
            self.counters["bootreply"] += 1
        else:
            data = self._reply(msg, 5, t, socket.inet_aton(ip), True, known, src_ip, src_port)
            self.counters["ack"] += 1
        return Decision(data, dip, port, bcast, row, self._event(t.node_id, now))

    def _request(self, msg: DhcpMessage, snap: Snapshot, now: float, src_ip: str,
                 src_port: int) -> Decision | None:
        opts = msg.options
        sid = opts.get(54)
        req = opts.get(50)
        mac = msg.mac.hex(":")
        if sid is not None and sid != self.server_id:
            # SELECTING another server's offer: never answer (a NAK would wedge PXE ROMs).
            self.leases.drop_offer(mac)
            self.counters["other_server"] += 1
            return None
        t, _ = self._lookup(msg, snap)
        if req is not None and len(req) != 4:
            raise MalformedPacket("requested address length")
        if msg.ciaddr != ZERO and req is None:
            asked = socket.inet_ntoa(msg.ciaddr)  # RENEWING / REBINDING
        elif req is not None:
            asked = socket.inet_ntoa(req)  # SELECTING / INIT-REBOOT
        else:
            self.counters["dropped"] += 1
            return None
        if t is None and self._refusing is not None:
            return None  # refused for its architecture: no answer at all (handle() logs it)
        if t is None:
            # Unknown client, not served: if we once leased it this address, say no.
            lease = self.leases.of_mac(mac)
            if sid is not None or lease is not None and lease.ip != asked:
                return self._nak(msg, src_ip, src_port, b"unknown client")
            self.counters["ignored"] += 1
            return None
        if t.ip is not None:
            if asked != t.ip:
                return self._nak(msg, src_ip, src_port, b"wrong address")
            return self._grant(msg, t, asked, now, src_ip, src_port)
        lease = self.leases.of_mac(mac)
        if lease is not None and lease.ip == asked and self.leases.free_for(asked, mac, now):
            return self._grant(msg, t, asked, now, src_ip, src_port)
        if sid is not None:
            # SELECTING our offer that we no longer remember (restart): grant it if free.
            ip = self._allocate(mac, snap, now, asked)
            if ip == asked:
                return self._grant(msg, t, asked, now, src_ip, src_port)
            return self._nak(msg, src_ip, src_port, b"address not available")
        if lease is not None or not self._in_pool(asked):
            # We hold another address for it, or it asks outside our pool (wrong subnet).
            if lease is None and not self._in_pool_subnet(asked):
                return self._nak(msg, src_ip, src_port, b"wrong network")
            if lease is not None:
                return self._nak(msg, src_ip, src_port, b"wrong address")
        # INIT-REBOOT / REBINDING with no record of this client: RFC 2131 says stay silent.
        self.counters["no_record"] += 1
        return None

    # ------------------------------------------------------------------ shared database

    def lost_claim(self, row: dict[str, Any], holder: dict[str, Any] | None) -> None:
        """Another server holds the pool address we tried to grant: learn its holder so
        the allocator skips the address, and forget our binding."""
        ip = row["ip"]
        self.leases.forget(ip, row["mac"])
        if holder is not None:
            self.leases.put(ip, holder["mac"], holder["state"], float(holder["expires"]),
                            holder.get("node_id"), holder.get("client_id") or "")
        self.counters["lost_claims"] += 1

    def learn_holders(self, rows: list[dict[str, Any]]) -> None:
        """Active pool leases in the database (other servers' grants): the database wins
        over what we only offered or believed free."""
        for h in rows:
            mine = self.leases.get(h["ip"])
            if mine is not None and mine.mac == h["mac"] and mine.state == h["state"]:
                continue
            self.leases.put(h["ip"], h["mac"], h["state"], float(h["expires"]),
                            h.get("node_id"), h.get("client_id") or "")

    def nak_for(self, ack: Decision) -> Decision | None:
        """The NAK that replaces an ACK whose pool address another server claimed first
        (built from the ACK's own bytes: xid, chaddr, giaddr, flags and option 82)."""
        if not ack.data:
            return None
        try:
            msg = decode(ack.data)
        except MalformedPacket:
            return None
        msg.op = 1
        sid = msg.options.get(54)  # the ACK's own identifier (the address it came from)
        reply = make_reply(msg, 6, server_id=sid if sid and len(sid) == 4 else self.server_id,
                           options={56: b"address taken by another server"})
        if msg.giaddr != ZERO:
            reply.flags |= BROADCAST_FLAG
        return Decision(self._encode(reply, msg), ack.ip, ack.port, ack.broadcast)

    def _in_pool(self, ip: str) -> bool:
        pool = self.settings.pool
        if not pool:
            return False
        n = _ip_int(ip)
        return pool[0] <= n <= pool[1]

    def _in_pool_subnet(self, ip: str) -> bool:
        pool = self.settings.pool
        if not pool:
            return True
        m = int.from_bytes(self._pool_mask, "big")
        return _ip_int(ip) & m == pool[0] & m

    def _release(self, msg: DhcpMessage, snap: Snapshot, now: float) -> Decision | None:
        sid = msg.options.get(54)
        if sid is not None and sid != self.server_id:
            return None
        ip = socket.inet_ntoa(msg.ciaddr)
        mac = msg.mac.hex(":")
        lease = self.leases.get(ip)
        if lease is None or lease.mac != mac:
            return None
        lease = self.leases.put(ip, mac, RELEASED, now, lease.node_id, lease.client_id)
        # No reply to a RELEASE: the row goes to the writer with an empty datagram.
        return Decision(b"", "", 0, False, lease_row(lease, now, self.settings.server_name))

    def _decline(self, msg: DhcpMessage, snap: Snapshot, now: float) -> Decision | None:
        sid = msg.options.get(54)
        req = msg.options.get(50)
        if sid is not None and sid != self.server_id or req is None or len(req) != 4:
            return None
        ip = socket.inet_ntoa(req)
        mac = msg.mac.hex(":")
        lease = self.leases.get(ip)
        if lease is None or lease.mac != mac:
            return None
        lease = self.leases.put(ip, mac, DECLINED, now + DECLINE_HOLD, lease.node_id)
        return Decision(b"", "", 0, False, lease_row(lease, now, self.settings.server_name))

    def _inform(self, msg: DhcpMessage, snap: Snapshot, now: float, src_ip: str,
                src_port: int) -> Decision | None:
        t, _ = self._lookup(msg, snap)
        if t is None:
            self.counters["ignored"] += 1
            return None
        opts = dict(t.boot_opts)
        opts[1] = t.mask
        reply = make_reply(msg, 5, siaddr=t.siaddr, server_id=self.server_id, file=t.file,
                           options=opts)
        dip, port, bcast = self._dest(msg, src_ip, src_port)
        self.counters["ack"] += 1
        return Decision(self._encode(reply, msg), dip, port, bcast, None,
                        self._event(t.node_id, now))

    def _bootp(self, msg: DhcpMessage, snap: Snapshot, now: float, src_ip: str,
               src_port: int) -> Decision | None:
        t = self._target(snap, msg.mac, Firmware.OTHER)
        if t is None:
            self.counters["ignored"] += 1
            return None
        ip = self._address_for(t, msg.mac.hex(":"), snap, now)
        if ip is None:
            self.counters["pool_exhausted"] += 1
            return None
        return self._grant(msg, t, ip, now, src_ip, src_port, bootp=True)

    def _proxy(self, msg: DhcpMessage, mt: int, snap: Snapshot, src_ip: str, src_port: int,
               proxy_port: bool, now: float) -> Decision | None:
        """proxyDHCP (PXE 2.1): boot information only, never an address."""
        c = self.counters
        c["proxy_" + {1: "discover", 3: "request", 8: "inform"}.get(mt, "other")] += 1
        if mt not in (1, 3, 8):
            return None
        fw = classify_client(msg)
        if fw is Firmware.OTHER or not (msg.is_pxe_client or fw is Firmware.IPXE):
            c["ignored"] += 1
            return None
        if mt == 3 and not proxy_port:
            sid = msg.options.get(54)
            if sid != self.server_id:
                return None  # the client requests its address from the site's server
        t, _ = self._lookup(msg, snap)
        if t is None:
            c["ignored"] += 1
            return None
        opts = dict(t.boot_opts)
        for k in (1, 3, 6, 12, 15):
            opts.pop(k, None)
        rtype = 2 if mt == 1 and not proxy_port else 5
        reply = make_reply(msg, rtype, siaddr=t.siaddr, server_id=self.server_id, file=t.file,
                           options=opts)
        if proxy_port:
            # Boot server reply (PXE 2.1 2.2.6): straight back to the client's address and port.
            dip, port, bcast = src_ip, src_port, False
            if src_ip == "0.0.0.0":
                dip, port, bcast = BROADCAST, self.settings.client_port, True
        else:
            dip, port, bcast = self._dest(msg, src_ip, src_port)
        c["offer" if rtype == 2 else "ack"] += 1
        return Decision(self._encode(reply, msg), dip, port, bcast, None,
                        self._event(t.node_id, now))


__all__ = ["BOOTP_LEASE", "DECLINED", "BootFile", "Decision", "Engine", "Lease", "Settings"]
