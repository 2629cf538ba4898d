"""The DHCP service as `bootherd serve` runs it: DhcpService(ctx, lifecycle)."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

from ..logs import event
from ..policy import dhcp_boot
from .engine import Engine, Settings
from .leases import LeaseTable
from .leasewriter import LeaseWriter, load_leases
from .server import DhcpServer

log = logging.getLogger("bootherd.dhcp")


class DhcpService:
    name = "dhcp"

    def __init__(self, ctx: Any, lifecycle: Any):
        self.ctx = ctx
        cfg = ctx.config
        d = cfg.dhcp
        self.counters = ctx.metrics.protocol("dhcp")
        self.settings = Settings.from_config(cfg, ctx.server_name)
        self.leases = LeaseTable()
        self.engine = Engine(self.settings, partial(dhcp_boot, cfg=cfg), self.leases,
                             self.counters)
        self.writer = LeaseWriter(ctx.live.engine)
        live = ctx.live
        self.server = DhcpServer(
            self.engine, lambda: live.snapshot, address=d.address, port=d.port,
            writer=self.writer, proxy_port=d.proxy_port if d.mode == "proxy" else None,
            interface=d.interface,
            record_state=lifecycle.dhcp_acked,
            counters=self.counters, native_send=d.native_send, rcvbuf=d.rcvbuf,
            discover_deadline=d.discover_deadline,
            log_requests="dhcp" in cfg.log.requests,
            bad_input_interval=cfg.log.bad_input_interval)
        ctx.metrics.gauge("dhcp_leases", lambda: len(self.leases.by_ip))
        ctx.metrics.gauge("dhcp_lease_batch_largest", lambda: self.writer.largest)
        ctx.metrics.gauge("dhcp_lease_db_down", lambda: int(self.writer.down))
        ctx.metrics.count("dhcp", "lease_batches", lambda: self.writer.batches)
        ctx.metrics.count("dhcp", "lease_conflicts", lambda: self.writer.conflicts)
        # Replies the native sending thread could not send (udpsend.py); 0 without it.
        ctx.metrics.count("dhcp", "native_send_errors",
                          lambda: self.server.sender.errors if self.server.sender else 0)
        # What the kernel dropped on our sockets (a full receive queue), and what waits.
        ctx.metrics.count("dhcp", "socket_drops", self.server.socket_drops)
        ctx.metrics.gauge("dhcp_backlog", lambda: len(self.server.backlog))
        self._loop: asyncio.AbstractEventLoop | None = None

    # The writer thread reports here; the engine is only touched on the event loop.

    def _on_down(self, down: bool) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(setattr, self.engine, "pool_grants", not down)

    def _on_conflict(self, row: dict, token: Any, holder: dict | None) -> Any:
        """Another server claimed this pool address first: NAK our client (it starts over
        and gets another offer) and remember the holder."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.engine.lost_claim, row, holder)
        if not isinstance(token, tuple) or len(token) != 2:
            return None
        proto, decision = token
        nak = self.engine.nak_for(decision)
        if nak is None:
            return None
        self.counters["nak"] += 1
        return (proto, nak)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.writer.on_down = self._on_down
        self.writer.on_conflict = self._on_conflict
        loop = self._loop
        self.writer.on_holders = lambda rows: loop.call_soon_threadsafe(
            self.engine.learn_holders, rows)
        rows = await asyncio.to_thread(load_leases, self.ctx.live.engine)
        rows = [r for r in rows if ":" not in r.ip]  # IPv6 leases are the DHCPv6 server's
        self.leases.load(rows)
        await self.server.start()
        event(log, logging.INFO, "dhcp listening",
              address=[f"{a}:{p}" for a, p in self.server.bound], mode=self.settings.mode,
              leases=len(rows))

    async def stop(self) -> None:
        await self.server.stop()
