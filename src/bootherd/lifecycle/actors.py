"""The recovery ladder's hands: power cycles, IPODs and power-state sync.

`RecoveryActors` carries out the ladder's effects (`ladder.PowerCycle` through
the server's one power controller, in its priority lane, so a recovery shares
the building's caps but never waits behind a bulk power-on; `ladder.SendIpod`
through `bootherd.ipod`) and reports each outcome back to the coordinator,
which decides what follows (`Lifecycle.feed`).  It also runs power-state sync:
the nodes this server owns whose BMC can tell, asked at most
`recovery.power_sync_rate` per second and each at most every
`recovery.power_sync_interval` seconds, their answers handed to
`Coordinator.power_observed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from ..power.core import PowerOp
from . import store
from .ladder import SOURCE, PowerCycle, SendIpod

if TYPE_CHECKING:
    from .runner import Lifecycle

log = logging.getLogger("bootherd.lifecycle")

SYNC_SOURCE = "powersync"


class RecoveryActors:
    def __init__(self, lifecycle: Lifecycle, power: Any, ipod: Any,
                 clock: Callable[[], float] = time.time):
        self.lifecycle = lifecycle
        self.power = power    # power.controller.PowerController
        self.ipod = ipod      # ipod.Ipod, or None
        self.clock = clock
        self.cycles_done = 0
        self._sync_task: asyncio.Task | None = None

    def register(self) -> None:
        self.lifecycle.register(PowerCycle, self.cycle)
        self.lifecycle.register(SendIpod, self.send_ipod)

    # -- effects ----------------------------------------------------------------------

    async def cycle(self, e: PowerCycle) -> None:
        (res,) = await self.power.run(PowerOp.CYCLE, [e.node_id], pxe=True, pxe_optional=True,
                                      priority=True, source=SOURCE)
        self.cycles_done += res.ok
        self.lifecycle.feed(lambda lc, now: lc.recovery.power_done(
            e, res.ok, res.error, res.message, lc, now))

    async def send_ipod(self, e: SendIpod) -> None:
        answered, sent = False, ""
        if self.ipod is None:
            sent = "no IPOD sender in this process"
        else:
            try:
                answered = await self.ipod.ping(e.ip)
                if answered:
                    sent = self.ipod.send(e.node_id, e.ip)
            except OSError as err:  # no CAP_NET_RAW, no route: go on with the power cycle
                answered, sent = False, f"cannot send ICMP to {e.ip}: {err.strerror or err}"
            except Exception as err:  # noqa: BLE001 - unreported, the node would wait forever
                log.exception("IPOD to %s failed", e.node_id)
                answered, sent = False, f"IPOD failed: {type(err).__name__} {err}".strip()
        self.lifecycle.feed(lambda lc, now: lc.recovery.ipod_done(e, answered, sent, lc, now))

    # -- power-state sync ---------------------------------------------------------------

    def start(self) -> None:
        rate = self.lifecycle.config.recovery.power_sync_rate
        if rate > 0 and self._sync_task is None:
            self._sync_task = asyncio.create_task(self._sync(rate), name="power-sync")

    async def stop(self) -> None:
        if self._sync_task is not None:
            self._sync_task.cancel()
            try:
                await self._sync_task
            except asyncio.CancelledError:
                pass
            self._sync_task = None

    async def _sync(self, rate: float) -> None:
        while True:
            try:
                asked = await self.sync_once(rate)
            except DBAPIError as e:  # an outage is expected news, not a program error
                log.warning("power-state sync waits: inventory database unreachable (%s)",
                            str(e.orig or e).strip().splitlines()[0])
                asked = 0
            except Exception:  # noqa: BLE001 - sync must keep syncing
                log.exception("power-state sync pass failed")
                asked = 0
            if not asked:
                await asyncio.sleep(min(10.0, self.lifecycle.config.recovery.power_sync_interval))

    async def sync_once(self, rate: float) -> int:
        """Ask the BMCs of the nodes due, at `rate` per second; returns how many."""
        lc = self.lifecycle
        interval = lc.config.recovery.power_sync_interval
        engine = lc.live.engine
        now = self.clock()
        ids = await asyncio.to_thread(store.power_nodes, engine)
        life = lc.core.life
        due = sorted((life[n].power_at if n in life else 0.0, n) for n in ids
                     if n not in life or now - life[n].power_at >= interval)
        if not due:
            return 0
        me = lc.core.server
        recs = await asyncio.to_thread(store.records, engine, [n for _, n in due], now, me=me)
        # Each server syncs the nodes it owns, and those nobody does (or a gone server
        # did) that are its share (their heir).
        mine = [n for _, n in due if n not in recs or not recs[n].shared_to_other(me)]
        batch = max(1, int(rate))
        for i in range(0, len(mine), batch):
            part = mine[i:i + batch]
            t0 = time.monotonic()
            asked_at = self.clock()
            results = await self.power.run(PowerOp.STATUS, part, source=SYNC_SOURCE)
            seen = [(r.node_id, r.power) for r in results if r.ok]
            for nid in part:  # asked, answered or not: due again after the interval
                lc.core.life_of(nid).power_at = asked_at
            lc.feed(lambda core, now, seen=seen, at=asked_at: [
                fx for nid, p in seen for fx in core.power_observed(nid, p, at, now)])
            await asyncio.sleep(max(0.0, len(part) / rate - (time.monotonic() - t0)))
        return len(mine)
