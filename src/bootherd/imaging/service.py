"""The multicast imaging server as a `bootherd serve` service.

Takes only what it needs: the configuration, the live inventory (its engine, for the
disk_images table), the metrics and the lifecycle coordinator.  Receivers' progress
reports (POST /images/NAME/progress, see imaging.http) are kept here for the API and
handed to the coordinator, which turns a reloading node's into its states.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from ..config import Config, multicast_ports
from ..metrics import Metrics
from . import sessions as sv
from .store import ImageStore
from .transport import FileImage, ImagingServer

log = logging.getLogger("bootherd.imaging")

MAX_REPORTS = 10000


class ImagingService:
    name = "imaging"

    def __init__(self, config: Config, live: Any, metrics: Metrics,
                 http_port: Callable[[], int] | None = None, lifecycle: Any = None):
        cfg = config.imaging
        self.config = config
        self.live = live
        self.store = ImageStore(config.path(cfg.root), live.engine)
        self.counters = metrics.protocol("imaging")
        self.http_port = http_port or (lambda: int(config.http.port))
        self.lifecycle = lifecycle
        self.core = sv.Server(
            group=cfg.multicast_group, ports=multicast_ports(cfg.multicast_ports),
            rate=sv.mbit_to_bytes(cfg.rate_mbps), burst=cfg.burst_bytes,
            fec_proactive=cfg.fec_proactive, idle_timeout=cfg.idle_timeout,
            receiver_timeout=cfg.receiver_timeout, max_sessions=cfg.max_sessions,
            min_receivers=cfg.min_receivers, gather_timeout=cfg.gather_timeout,
            adapt_rate=cfg.adapt_rate, counters=self.counters, rng=random.Random())
        self.server = ImagingServer(
            self.core, address=cfg.address, port=cfg.port,
            interface_address=cfg.interface_address or cfg.address, ttl=cfg.ttl,
            loopback=cfg.loopback, open_image=self._open, on_ended=self._ended)
        self.reports: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.ended: list[dict[str, Any]] = []  # the last sessions, newest last
        metrics.gauge("imaging_sessions", lambda: len(self.core.sessions))
        metrics.gauge("imaging_receivers",
                      lambda: sum(len(s.receivers) for s in self.core.sessions.values()))
        metrics.registry.register(_SessionCollector(self))

    def _open(self, name: str) -> FileImage:
        path, header = self.store.open(name)
        return FileImage(path, header)

    def _ended(self, e: sv.Ended) -> None:
        self.ended.append({"session": e.session, "image": e.image, "reason": e.reason,
                           "at": time.time()})
        del self.ended[:-20]

    async def start(self) -> None:
        self.core.http_port = self.http_port()
        await self.server.start()
        log.info("imaging listening address=%s port=%d group=%s ports=%s rate_mbps=%g",
                 self.config.imaging.address, self.server.port, self.core.group,
                 self.config.imaging.multicast_ports, self.config.imaging.rate_mbps)

    async def stop(self) -> None:
        await self.server.stop()

    # -- for the API and the HTTP routes

    def sessions(self) -> list[dict[str, Any]]:
        self.core.http_port = self.http_port()
        return self.core.info(time.monotonic())

    def report(self, who: str, node_id: str | None, body: dict[str, Any]) -> None:
        """A receiver's progress report (from POST /images/NAME/progress)."""
        key = node_id or who
        self.reports.pop(key, None)
        self.reports[key] = {**body, "node_id": node_id, "address": who, "at": time.time()}
        while len(self.reports) > MAX_REPORTS:
            self.reports.popitem(last=False)
        self.counters["progress_reports"] += 1
        if node_id is not None and self.lifecycle is not None:
            done, total = body.get("done_chunks", 0), body.get("chunks", 0)
            detail = f"{done}/{total} chunks via {body.get('via', '?')}"
            if body.get("message"):
                detail += f": {body['message']}"
            self.lifecycle.reload_reported(node_id, body["image"], body.get("state", ""),
                                           detail)

    def expect(self, image: str) -> None:
        """A node was ordered to reload with `image`: its session waits for it (at most
        imaging.gather_timeout seconds after the last such order)."""
        now = time.monotonic()
        self.core.expect(image, now, now + self.config.imaging.gather_timeout)


class _SessionCollector:
    """Per-session and per-receiver series for /metrics."""

    def __init__(self, svc: ImagingService):
        self.svc = svc

    def collect(self) -> Iterable[GaugeMetricFamily]:
        recv = GaugeMetricFamily("bootherd_imaging_session_receivers",
                                 "Receivers in an imaging session", labels=["image", "session"])
        sent = GaugeMetricFamily("bootherd_imaging_session_bytes_sent",
                                 "Bytes multicast by a session", labels=["image", "session"])
        queued = GaugeMetricFamily("bootherd_imaging_session_queued_chunks",
                                   "Chunks queued in a session", labels=["image", "session"])
        done = GaugeMetricFamily("bootherd_imaging_receiver_done_chunks",
                                 "Chunks a receiver has", labels=["image", "receiver", "address"])
        for s in list(self.svc.core.sessions.values()):
            sid = f"{s.id:08x}"
            recv.add_metric([s.image, sid], len(s.receivers))
            sent.add_metric([s.image, sid], s.bytes_sent)
            queued.add_metric([s.image, sid], s.pending.count(1))
            for r in list(s.receivers.values()):
                done.add_metric([s.image, f"{r.receiver:08x}", r.addr[0]], r.done)
        yield from (recv, sent, queued, done)
