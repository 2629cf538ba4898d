"""The TMCD service as `bootherd serve` runs it: views, core and transport, wired to
the lifecycle coordinator (state reports, configuration digests, bootwhat)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..inventory.model import Node, Snapshot
from ..logs import RateLimited, event
from ..policy import BootDecision
from .server import TmcdCore, TmcdLifecycle, TmcdServer
from .tls import server_context
from .views import Views, ViewSettings

log = logging.getLogger("bootherd.tmcd")


def make_views(config: Any, bootwhat: Callable[[Snapshot, Node], BootDecision],
               ipod_secret: bytes) -> Views:
    """The one Views of a process (the TMCD server and its HTTP/JSON view share its
    cache).  `bootwhat` is the lifecycle coordinator's query: the same decision as
    bootinfo's, which never clears a one-shot next_os (bootinfo, which actually boots
    the node, does that)."""
    return Views(ViewSettings.from_config(config, ipod_secret, bootwhat))


class TmcdService:
    name = "tmcd"

    def __init__(self, config: Any, live: Any, metrics: Any, lifecycle: TmcdLifecycle,
                 views: Views):
        t = config.tmcd
        self.views = views
        self.core = TmcdCore(views, metrics.protocol("tmcd"), t.max_request, t.trusted_ranges,
                             configs=lifecycle)
        ports = tuple(p for p in (t.port, t.fallback_port) if p)
        ports = tuple(dict.fromkeys(ports))  # the same port twice would not bind
        self.server = TmcdServer(
            self.core, lambda: live.snapshot, address=t.address, ports=ports,
            max_connections=t.max_connections, read_timeout=t.read_timeout,
            max_request=t.max_request, lifecycle=lifecycle, tls=server_context(config),
            native_front=t.native_front,
            node_state=lambda nid: (live.state_of(nid) or (None,))[0])
        self.server.log_requests = "tmcd" in config.log.requests
        # Every new snapshot reaches the server before any request sees it, so the native
        # front may answer plain pure requests from its table.
        self.server.answer_natively = True
        live.on_change(lambda _old, _new: self.server.snapshot_changed())
        self.server.bad_input = RateLimited(log, config.log.bad_input_interval)
        metrics.gauge("tmcd_active_connections", lambda: self.server.open_connections)
        metrics.gauge("tmcd_queued_connections", lambda: len(self.server.waiting) + (
            len(self.server.front.backlog) if self.server.front is not None else 0))

    async def start(self) -> None:
        await self.server.start()
        event(log, logging.INFO, "tmcd listening",
              address=[f"{a}:{p}" for a, p in self.server.bound])

    async def stop(self) -> None:
        await self.server.stop()
