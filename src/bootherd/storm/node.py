"""One virtual node: power on, then the boot sequence of the original note.

    dhcp    PXE firmware DHCP (DISCOVER/REQUEST; legacy: + proxyDHCP on 4011)
    tftp    the loader: tsize=0 probe aborted after the OACK, then the transfer
            (legacy: + the frisbee loader's 11 requests)
    loader  DHCP again, then bootinfo (WAIT -> wait for an ORDER -> ask again)
    os      DHCP again, then TMCD (optimized: status, fullconfig, state TBSETUP;
            legacy: the 26 requests)
    files   tarballs and RPMs over HTTP, then `state ISUP`

The IPv6 profile plays UEFI firmware's part only: dhcp is DHCPv6 through a relay
(storm.dhcp6), tftp fetches the loader of its boot URL over TFTP or HTTP.

A failed firmware phase "reboots" the node (the note's MBR hack) and starts
over; each reboot is counted.  Per-phase times add up over reboots.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from ..boottype import BootType
from ..tmcd.protocol import parse_kv, render_request, split_fullconfig
from . import clients as c
from .dhcp6 import Dhcp6Client, Dhcp6Relay, boot_target
from .net import Loss, open_udp

PHASES = ("dhcp", "tftp", "loader", "os", "files")
# OVMF over IPv6: the largest block an Ethernet MTU carries (1500 - 40 - 8 - 4), 4 blocks
# a window (what it asks over IPv4, docs/tftp.md).
UEFI6_TFTP_OPTIONS = {"blksize": "1448", "windowsize": "4"}
ALL_STATES = ("off",) + PHASES + ("up", "failed")

FRISBEE_FILES = (
    ("frisbee/boot/boot.4th.gz", False), ("frisbee/boot/loader.rc.gz", False),
    ("frisbee/boot/loader.4th.gz", False), ("frisbee/boot/support.4th.gz", False),
    ("frisbee/boot/defaults/loader.conf", False), ("frisbee/boot/loader.conf", False),
    ("frisbee/boot/loader.conf.local", False),
    ("frisbee/boot/kernel.ko.gz", True), ("frisbee/boot/kernel.ko.gz", False),
    ("frisbee/boot/mfsroot.gz", True), ("frisbee/boot/mfsroot.gz", False),
)  # (path, existence check only)

# The 26 requests a node sent in the original system (the note, step D1).
LEGACY_TMCD = ("reboot", "status", "ntpinfo", "state TBSETUP", "reboot", "status", "mounts",
               "accounts", "ifconfig", "tunnels", "hostnames", "routing", "status", "ifconfig",
               "routelist", "trafgens", "nseconfigs", "rpms", "tarballs", "startupcmd", "delay",
               "ipodinfo", "vnodelist", "isalive", "creator")  # + "state ISUP" at the end


@dataclass
class Env:
    """What every node of a run shares: addresses, profile, timers, loss."""

    profile: str
    phases: tuple[str, ...]
    dhcp: tuple[str, int]
    proxy: tuple[str, int]
    dhcp_client_port: int
    tftp: tuple[str, int]
    bootinfo: tuple[str, int]
    bootinfo_client_port: int
    order_port: int
    tmcd: list[tuple[str, int]]
    http: tuple[str, int]
    loss: Loss
    http_override: bool = False  # --server http=...: ignore the SERVER= of tarball lines
    relay: c.DhcpRelay | None = None
    max_reboots: int = 3
    reboot_delay: float = 1.0
    wait_timeout: float = 120.0
    on_wait: Any = None  # fn(node_id): the node was told WAIT
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ALL_STATES, 0))
    # Several servers (one endpoints dict each: dhcp, tftp, bootinfo, tmcd, http).  DHCP
    # goes to all of them; a node then follows the server whose ACK it took (next-server),
    # and TMCD/HTTP fail over to the others.  Empty: the single server above.
    sets: list[dict[str, Any]] = field(default_factory=list)
    order_poll: float = 0.0  # a loader told WAIT asks again after this many seconds
    dhcp6: tuple[str, int] = ("::1", 547)  # the IPv6 profile's DHCPv6 server
    relay6: Dhcp6Relay | None = None
    hang: Any = None  # async fn(node) awaited as its OS starts: a hung kernel (storm/bmc.py)

    def ep(self, node: SimNode, name: str) -> Any:
        if self.sets:
            return self.sets[node.srv % len(self.sets)][name]
        return getattr(self, name)

    def follow(self, node: SimNode, ack: Any) -> None:
        """Use the server that granted the lease for the next phases."""
        if not self.sets:
            return
        sid = ack.options.get(54)
        for i, s in enumerate(self.sets):
            try:
                if sid == socket.inet_aton(s["dhcp"][0]):
                    node.srv = i
                    node.servers_used.add(i)
                    return
            except OSError:
                continue

    def tmcd_order(self, node: SimNode) -> list[tuple[str, int]]:
        if not self.sets:
            return self.tmcd
        n = len(self.sets)
        return [ep for k in range(n) for ep in self.sets[(node.srv + k) % n]["tmcd"]]


@dataclass
class SimNode:
    node_id: str
    ip: str
    mac: bytes
    loader: str
    start_at: float  # seconds after the storm's t0
    tally: c.Tally = field(default_factory=c.Tally)
    state: str = "off"
    reason: str = ""
    fail_phase: str = ""
    t_on: float = 0.0
    t_end: float = 0.0
    reboots: int = 0
    phase_time: dict[str, float] = field(default_factory=dict)
    transitions: list[tuple[float, str]] = field(default_factory=list)
    boot_answer: str = ""
    bytes_tftp: int = 0
    bytes_http: int = 0
    srv: int = 0  # index in Env.sets of the server this node follows
    servers_used: set[int] = field(default_factory=set)
    boot6: str = ""  # the IPv6 profile: "pxe" (TFTP) or "http" (UEFI HTTP boot)
    granted: str = ""  # the IPv6 profile: the address DHCPv6 granted
    boot_url: str = ""  # the IPv6 profile: option 59

    def enter(self, env: Env, state: str) -> None:
        now = time.time()
        if self.transitions and self.state in PHASES:
            self.phase_time[self.state] = self.phase_time.get(self.state, 0.0) + \
                now - self.transitions[-1][0]
        env.counts[self.state] -= 1
        env.counts[state] += 1
        self.state = state
        self.tally.phase = state
        self.transitions.append((now, state))

    def result(self) -> dict[str, Any]:
        return {
            "node": self.node_id, "ip": self.ip, "outcome": self.state, "reason": self.reason,
            "fail_phase": self.fail_phase, "t_on": self.t_on, "t_end": self.t_end,
            "boot_time": (self.t_end - self.t_on) if self.state == "up" else None,
            "reboots": self.reboots, "phase_time": self.phase_time,
            "requests": dict(self.tally.requests), "retries": dict(self.tally.retries),
            "retries_by_protocol": dict(self.tally.by_protocol),
            "latency": self.tally.latency,
            "transitions": self.transitions, "boot_answer": self.boot_answer,
            "bytes_tftp": self.bytes_tftp, "bytes_http": self.bytes_http,
            "servers_used": sorted(self.servers_used),
            "boot6": self.boot6, "granted": self.granted, "boot_url": self.boot_url,
        }


class Reboot(Exception):
    """The node power-cycles (firmware gave up, or bootinfo said REBOOT)."""


async def boot(node: SimNode, env: Env, t0: float) -> None:
    await asyncio.sleep(max(0.0, t0 + node.start_at - time.time()))
    node.t_on = time.time()
    env.counts["off"] -= 1
    env.counts["dhcp"] += 1
    node.state = "dhcp"
    node.tally.phase = "dhcp"
    node.transitions.append((node.t_on, "dhcp"))
    dhcp_servers = [s["dhcp"] for s in env.sets] if env.sets else env.dhcp
    dhcp = c.DhcpClient(env.relay, env.loss, dhcp_servers, node.mac, c.node_uuid(node.mac),
                        node.tally) if env.relay is not None else None
    dhcp6 = Dhcp6Client(env.relay6, env.dhcp6, node.mac, node.boot6, node.tally) \
        if env.relay6 is not None else None
    while True:
        try:
            if dhcp6 is not None:
                await _sequence6(node, env, dhcp6)
            else:
                await _sequence(node, env, dhcp)
            node.t_end = time.time()
            node.enter(env, "up")
            return
        except Reboot as e:
            node.reboots += 1
            if node.reboots > env.max_reboots:
                node.fail_phase, node.reason = node.state, f"{e} (after {node.reboots - 1} reboots)"
                break
            await asyncio.sleep(env.reboot_delay)
            node.enter(env, "dhcp")
        except c.ProtocolFailure as e:
            node.fail_phase, node.reason = node.state, str(e)
            break
        except OSError as e:
            node.fail_phase, node.reason = node.state, f"{type(e).__name__}: {e}"
            break
    node.t_end = time.time()
    node.enter(env, "failed")


async def _sequence(node: SimNode, env: Env, dhcp: c.DhcpClient | None) -> None:
    legacy = env.profile == "legacy"
    loader = node.loader
    if "dhcp" in env.phases and dhcp is not None:
        try:
            ack = await dhcp.dora("pxe", c.PXE_DISCOVER_TIMEOUTS, c.PXE_REQUEST_TIMEOUTS)
        except c.ProtocolFailure as e:
            raise Reboot(str(e)) from None
        env.follow(node, ack)
        if legacy:
            try:
                ack = await dhcp.proxy_request(env.loss, node.ip, env.dhcp_client_port, env.proxy)
            except c.ProtocolFailure as e:
                # A server without a proxyDHCP port (bootherd in authoritative mode) put
                # the boot file in its offer already; without one the firmware gives up.
                if not ack.file.strip(b"\0"):
                    raise Reboot(str(e)) from None
        f = ack.file.split(b"\0", 1)[0].decode("latin-1")
        if f and "://" not in f:
            loader = f
    if "tftp" in env.phases:
        node.enter(env, "tftp")
        opts = {"blksize": "1456"}
        if not legacy:
            opts["windowsize"] = "8"
        tftp_server = env.ep(node, "tftp")
        try:
            await c.tftp_get(env.loss, node.ip, tftp_server, loader, {"tsize": "0"}, node.tally,
                             probe=True)
            node.bytes_tftp += await c.tftp_get(env.loss, node.ip, tftp_server, loader, opts,
                                                node.tally)
            if legacy:
                for path, check in FRISBEE_FILES:
                    node.bytes_tftp += await c.tftp_get(env.loss, node.ip, tftp_server, path,
                                                        {"tsize": "0"} if check else opts,
                                                        node.tally, probe=check)
        except c.ProtocolFailure as e:
            raise Reboot(str(e)) from None
    if "loader" in env.phases or "bootinfo" in env.phases:
        await _loader(node, env, dhcp)
    if "os" in env.phases or "tmcd" in env.phases:
        await _os(node, env, dhcp, legacy)


async def _sequence6(node: SimNode, env: Env, dhcp6: Dhcp6Client) -> None:
    """The IPv6 profile: UEFI firmware's part (DHCPv6, then the loader of option 59 over
    TFTP, with OVMF's size probe first, or over HTTP), from the address it was granted."""
    try:
        node.granted, node.boot_url = await dhcp6.boot()
    except c.ProtocolFailure as e:
        raise Reboot(str(e)) from None
    if "tftp" not in env.phases:
        return
    node.enter(env, "tftp")
    scheme, server, path = boot_target(node.boot_url, env.tftp[1], env.http[1])
    try:
        if scheme == "tftp":
            name = path.lstrip("/")
            await c.tftp_get(env.loss, node.granted, server, name, {"tsize": "0"}, node.tally,
                             probe=True)
            node.bytes_tftp += await c.tftp_get(env.loss, node.granted, server, name,
                                                UEFI6_TFTP_OPTIONS, node.tally)
        else:
            node.bytes_http += await c.http_get(env.loss, node.granted, server, path, node.tally)
    except c.ProtocolFailure as e:
        raise Reboot(str(e)) from None


async def _loader(node: SimNode, env: Env, dhcp: c.DhcpClient | None) -> None:
    while True:
        node.enter(env, "loader")
        ep = await open_udp(env.loss, node.ip, env.bootinfo_client_port, reuse=True)
        try:  # the loader reboots when it gets no answer
            if dhcp is not None and "dhcp" in env.phases:
                env.follow(node, await dhcp.dora("loader", c.OS_DHCP_TIMEOUTS,
                                                 c.OS_DHCP_TIMEOUTS[:2]))
            answer = await c.bootinfo_ask(ep, env.ep(node, "bootinfo"), env.order_port,
                                          node.tally, env.wait_timeout,
                                          lambda: _told_wait(env, node), env.order_poll)
        except c.WaitTimeout:
            raise
        except c.ProtocolFailure as e:
            raise Reboot(str(e)) from None
        finally:
            ep.close()
        node.boot_answer = answer.type.name
        if answer.type == BootType.REBOOT:
            raise Reboot("bootinfo said REBOOT")
        if answer.type == BootType.RESTART:
            continue
        return


def _told_wait(env: Env, node: SimNode) -> None:
    node.boot_answer = "WAIT"
    if env.on_wait is not None:
        env.on_wait(node.node_id)


def _files(sections: dict[str, str], default: tuple[str, int]) -> list[tuple[tuple[str, int], str]]:
    """(server, path) of each tarball and RPM line (SERVER=host:port, else the default)."""
    out = []
    for sec, key in (("tarballs", "TARBALL"), ("rpms", "RPM")):
        for line in sections.get(sec, "").splitlines():
            kv = parse_kv(line)
            if not kv.get(key):
                continue
            server = default
            host, _, port = kv.get("SERVER", "").rpartition(":")
            if host and port.isdigit():
                server = (host, int(port))
            out.append((server, kv[key]))
    return out


async def _os(node: SimNode, env: Env, dhcp: c.DhcpClient | None, legacy: bool) -> None:
    node.enter(env, "os")
    if env.hang is not None:
        await env.hang(node)
    if dhcp is not None and "dhcp" in env.phases:
        try:  # no address: the node's watchdog power-cycles it
            env.follow(node, await dhcp.dora("os", c.OS_DHCP_TIMEOUTS, c.OS_DHCP_TIMEOUTS[:2]))
        except c.ProtocolFailure as e:
            raise Reboot(str(e)) from None

    async def tmcc(cmd: str) -> str:
        name, _, args = cmd.partition(" ")
        raw = await c.tmcd_request(env.loss, node.ip, env.tmcd_order(node),
                                   render_request(name, args), node.tally, bool(env.sets))
        return raw.decode("utf-8", "replace")

    sections: dict[str, str] = {}
    if legacy:
        for cmd in LEGACY_TMCD:
            reply = await tmcc(cmd)
            if cmd in ("tarballs", "rpms"):
                sections[cmd] = reply
    else:
        status = await tmcc("status")
        if status.startswith("ALLOCATED"):
            sections = split_fullconfig(await tmcc("fullconfig"))
        await tmcc("state TBSETUP")
    if "files" in env.phases or "http" in env.phases:
        node.enter(env, "files")
        alternates = [s["http"] for s in env.sets] or None
        for server, path in _files(sections, env.ep(node, "http")):
            if env.http_override:
                server = env.ep(node, "http")
            node.bytes_http += await c.http_get(env.loss, node.ip, server,
                                                "/files/" + path.lstrip("/"), node.tally,
                                                alternates=alternates)
    await tmcc("state ISUP")
