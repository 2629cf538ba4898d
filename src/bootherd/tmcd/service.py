"""The TMCD service as `bootherd serve` runs it: create_service(ctx) -> TmcdService."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from ..inventory.model import Node, Snapshot
from ..policy import BootDecision, decide_boot
from .server import TmcdCore, TmcdServer
from .tls import server_context
from .views import Views, ViewSettings

log = logging.getLogger("bootherd.tmcd")


def make_bootwhat(cfg: Any) -> Callable[[Snapshot, Node], BootDecision]:
    """bootwhat through bootherd.policy.decide_boot (the same decision as bootinfo).

    TMCD's bootwhat is a query: it never clears a one-shot next_os (bootinfo,
    which actually boots the node, does that)."""
    return lambda snap, node: decide_boot(snap, node, cfg, client_version=1)


def make_views(ctx: Any) -> Views:
    secret = ctx.shared.get("ipod_secret")
    if not secret:
        # One secret per process, shared so other services can check ipod hashes.
        secret = ctx.shared["ipod_secret"] = secrets.token_bytes(32)
    return Views(ViewSettings.from_config(ctx.config, secret, make_bootwhat(ctx.config)))


class TmcdService:
    name = "tmcd"

    def __init__(self, ctx: Any):
        self.ctx = ctx
        t = ctx.config.tmcd
        self.views = make_views(ctx)
        counters = ctx.metrics.protocol("tmcd")
        self.core = TmcdCore(self.views, counters, t.max_request, t.trusted_ranges)
        ports = tuple(p for p in (t.port, t.fallback_port) if p)
        ports = tuple(dict.fromkeys(ports))  # the same port twice would not bind
        live = ctx.live
        self.server = TmcdServer(
            self.core, lambda: live.snapshot, address=t.address, ports=ports,
            max_connections=t.max_connections, read_timeout=t.read_timeout,
            max_request=t.max_request,
            record_state=lambda nid, st, committed=None: live.record_state(
                nid, st, "tmcd", committed=committed),
            tls=server_context(ctx.config))
        ctx.shared["tmcd"] = self
        ctx.metrics.gauge("tmcd_active_connections", lambda: self.server.active)
        ctx.metrics.gauge("tmcd_queued_connections", lambda: len(self.server.waiting))

    async def start(self) -> None:
        await self.server.start()
        log.info("tmcd listening on %s", ", ".join(f"{a}:{p}" for a, p in self.server.bound))

    async def stop(self) -> None:
        await self.server.stop()


def create_service(ctx: Any) -> TmcdService:
    return TmcdService(ctx)
