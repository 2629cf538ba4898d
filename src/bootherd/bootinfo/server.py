"""bootinfo UDP server: a thin asyncio transport around codec + policy.

- listens on (bootinfo.address, bootinfo.port); replies go to
  <client IP>:bootinfo.client_port from the listening socket;
- orders (wake a waiting loader) go from a second socket bound to
  bootinfo.order_port with SO_REUSEPORT, so `bootherd node wake` in another
  process can bind the same port and send from it too;
- malformed packets are counted (metrics "bootinfo"/"malformed") and dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from ..inventory.model import Node, Snapshot
from ..policy import BootDecision, BootType, clear_next_os, decide_boot
from ..states import BootStateRecorder, State, reply_state
from . import codec
from .codec import BootWhat, CodecError, Opcode

log = logging.getLogger("bootherd.bootinfo")

ORDER_KINDS = (BootType.AUTO, BootType.REBOOT, BootType.RESTART)


def boot_what(decision: BootDecision) -> BootWhat:
    """The wire form of a policy decision."""
    t = decision.type
    cmd = decision.cmdline
    if t is BootType.MB:
        return BootWhat(t, server=decision.server or "0.0.0.0", filename=decision.path,
                        cmdline=cmd)
    if t is BootType.MFS:
        mfs = f"{decision.server}:{decision.path}" if decision.server else decision.path
        return BootWhat(t, mfs=mfs, cmdline=cmd)
    if t is BootType.PART:
        return BootWhat(t, partition=decision.partition or 0, cmdline=cmd)
    if t is BootType.SYSID:
        return BootWhat(t, sysid=decision.sysid or 0, cmdline=cmd)
    if t is BootType.DISKPART:
        return BootWhat(t, disk=decision.disk or 0, partition=decision.partition or 0,
                        cmdline=cmd)
    return BootWhat(t)


def order_packet(kind: BootType) -> bytes:
    kind = BootType(kind)
    if kind not in ORDER_KINDS:
        raise ValueError(f"order must be AUTO, REBOOT or RESTART, not {kind.name}")
    return codec.reply(BootWhat(kind), opcode=Opcode.ORDER)


def bind_order_socket(address: str, port: int) -> socket.socket:
    """A UDP socket for orders, shareable between processes of one user."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Decider:
    """decide_boot plus the one-shot next_os bookkeeping, shared by bootinfo and
    iPXE in one process (ctx.shared["boot_decider"]).

    A served next_os is cleared in the database from a thread; until the new
    snapshot arrives, repeats from the same node must not get it again."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.consumed: dict[str, str] = {}  # node_id -> next_os already served
        self._tasks: set[asyncio.Task] = set()
        ctx.live.on_change(self._on_change)

    def decide(self, snap: Snapshot, node: Node | None, version: int = 1) -> BootDecision:
        if node is not None and node.next_os and self.consumed.get(node.node_id) == node.next_os:
            node = dataclasses.replace(node, next_os=None)
        decision = decide_boot(snap, node, self.ctx.config, version)
        if decision.consumes_next_os and node is not None and decision.image:
            self.consumed[node.node_id] = decision.image
            task = asyncio.get_running_loop().create_task(
                self._clear(node.node_id, decision.image))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return decision

    async def _clear(self, node_id: str, image: str) -> None:
        try:
            await asyncio.to_thread(clear_next_os, self.ctx.live.engine, node_id, image)
        except Exception as e:  # noqa: BLE001 - logged; the node got its answer already
            log.warning("clearing next_os of %s failed: %s", node_id, e)

    async def drain(self) -> None:
        """Wait for pending next_os clearings (tests, shutdown)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _on_change(self, old: Snapshot, new: Snapshot) -> None:
        for node_id, image in list(self.consumed.items()):
            n = new.nodes.get(node_id)
            if n is None or n.next_os != image:
                del self.consumed[node_id]


def get_decider(ctx: Any) -> Decider:
    d = ctx.shared.get("boot_decider")
    if d is None:
        d = ctx.shared["boot_decider"] = Decider(ctx)
    return d


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, server: BootinfoServer):
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        try:
            self.server.handle(data, addr)
        except Exception:  # one bad packet must never stop the server
            self.server.counters["errors"] += 1
            log.exception("bootinfo: failed on a packet from %s", addr[0])

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a loader that went away: not our problem.
        self.server.counters["send_errors"] += 1


class BootinfoServer:
    def __init__(self, ctx: Any, clock: Callable[[], float] = time.monotonic):
        self.ctx = ctx
        self.cfg = ctx.config
        self.live = ctx.live
        self.counters = ctx.metrics.protocol("bootinfo")
        self.recorder = BootStateRecorder(ctx.live, "bootinfo", clock=clock)
        self.transport: asyncio.DatagramTransport | None = None
        self.order_transport: asyncio.DatagramTransport | None = None
        self.decider = get_decider(ctx)
        self.last_order: dict[str, BootType] = {}
        # Nodes whose latest answer from us was WAIT.  The auto-wake goes by this,
        # not by the node's state: during a storm a late DHCP retransmission can
        # overwrite PXEWAIT while the loader is still waiting for its order.
        self.told_wait: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        ctx.live.on_change(self._on_change)

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        bi = self.cfg.bootinfo
        loop = asyncio.get_running_loop()
        try:
            self.transport, _ = await loop.create_datagram_endpoint(
                lambda: _Proto(self), local_addr=(bi.address, bi.port))
        except OSError as e:
            raise OSError(e.errno, f"bootinfo {bi.address}:{bi.port}: {e.strerror}") from None
        sock = self.transport.get_extra_info("socket")
        try:  # a boot storm arrives at once; the default 208 KiB overflows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
        except OSError:
            pass
        try:
            osock = bind_order_socket(bi.address, bi.order_port)
        except OSError as e:
            self.transport.close()
            raise OSError(e.errno,
                          f"bootinfo orders {bi.address}:{bi.order_port}: {e.strerror}") from None
        self.order_transport, _ = await loop.create_datagram_endpoint(
            lambda: _Proto(self), sock=osock)
        log.info("bootinfo listening on %s:%d (orders from port %d)", bi.address,
                 self.port, bi.order_port)

    async def stop(self) -> None:
        for t in (self.transport, self.order_transport):
            if t is not None:
                t.close()
        for task in list(self._tasks):
            task.cancel()
        self.transport = self.order_transport = None

    @property
    def port(self) -> int:
        assert self.transport is not None
        return self.transport.get_extra_info("sockname")[1]

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- requests ----------------------------------------------------------------

    def handle(self, data: bytes, addr: tuple) -> None:
        c = self.counters
        c["packets"] += 1
        try:
            pkt = codec.decode(data)
        except CodecError:
            c["malformed"] += 1
            return
        snap: Snapshot = self.live.snapshot
        ip = addr[0]
        if pkt.opcode == Opcode.REQUEST:
            node = snap.by_ip.get(ip)
        elif pkt.opcode == Opcode.KEYED_REQUEST:
            try:
                node = snap.by_privkey.get(pkt.key())
            except CodecError:
                c["malformed"] += 1
                return
            if node is None:
                c["unknown_key"] += 1  # never tell a stranger what a node boots
                return
        else:
            c["ignored"] += 1  # REPLY/ORDER/ACK/INFO are not questions for us
            return
        c["requests"] += 1
        decision = self.decide(snap, node, pkt.version)
        try:
            out = codec.reply(boot_what(decision), version=pkt.version)
        except CodecError as e:
            c["encode_errors"] += 1
            log.warning("bootinfo: cannot encode answer for %s (%s): %s",
                        node.node_id if node else ip, decision.image, e)
            return
        assert self.transport is not None
        self.transport.sendto(out, (ip, self.cfg.bootinfo.client_port))
        c["replies"] += 1
        c[f"reply_{decision.type.name.lower()}"] += 1
        if node is None:
            c["unknown_nodes"] += 1
            return
        if decision.type == BootType.WAIT:
            self.told_wait.add(node.node_id)
        else:
            self.told_wait.discard(node.node_id)
        self.recorder.answered(node.node_id, ip, reply_state(decision.type),
                               decision.image or decision.reason)

    def decide(self, snap: Snapshot, node: Node | None, version: int = 1) -> BootDecision:
        return self.decider.decide(snap, node, version)

    # -- orders ------------------------------------------------------------------

    async def send_order(self, node_id: str, kind: BootType | str | None = None,
                         resend: bool = False) -> str:
        """Send an ORDER to a waiting loader and move the node to PXEWAKEUP.

        kind: AUTO (default: ask again), REBOOT or RESTART, as BootType or name;
        `resend` repeats the node's last order.  Returns a one-line report.
        Raises KeyError (unknown node), ValueError (bad kind, no control IP),
        OSError (server not running)."""
        if kind is None:
            kind = self.last_order.get(node_id, BootType.AUTO) if resend else BootType.AUTO
        elif isinstance(kind, str):
            try:
                kind = BootType[kind.upper()]
            except KeyError:
                raise ValueError(f"order must be AUTO, REBOOT or RESTART, not {kind!r}") from None
        pkt = order_packet(kind)
        node = self.live.snapshot.nodes.get(node_id)
        if node is None:
            raise KeyError(f"unknown node {node_id!r}")
        ip = node.control_ip
        if not ip:
            raise ValueError(f"node {node_id} has no control IP")
        if self.order_transport is None:
            raise OSError("bootinfo server is not running")
        dest = (ip, self.cfg.bootinfo.client_port)
        self.order_transport.sendto(pkt, dest)
        self.last_order[node_id] = BootType(kind)
        self.counters["orders"] += 1
        name = BootType(kind).name
        self.live.record_state(node_id, State.PXEWAKEUP, "bootinfo",
                               ("re-sent " if resend else "") + name)
        return f"sent {name} order to {dest[0]}:{dest[1]}"

    def _on_change(self, old: Snapshot, new: Snapshot) -> None:
        """Wake nodes waiting in the loader once they have something to boot."""
        ipxe_waiters = self.ctx.shared.get("ipxe_waiters", set())
        for node_id in list(self.told_wait):
            if node_id in ipxe_waiters:
                continue  # iPXE waiters poll by themselves
            a, b = old.nodes.get(node_id), new.nodes.get(node_id)
            if b is None or b.allocation is None:
                continue
            if a is None or a.allocation is None or _boot_os(a) != _boot_os(b):
                self.told_wait.discard(node_id)
                self.counters["auto_wakeups"] += 1
                self._spawn(self._wake(node_id))

    async def _wake(self, node_id: str) -> None:
        try:
            await self.send_order(node_id)
        except (KeyError, ValueError, OSError) as e:
            log.warning("waking %s failed: %s", node_id, e)


def _boot_os(n: Node) -> tuple:
    return (n.next_os, n.temp_os, n.default_os, n.pxe_loader)
