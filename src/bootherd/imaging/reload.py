"""The imaging actor of the reload cycle: carries out the coordinator's `StartReload`.

The coordinator (lifecycle/core.py) decides everything about a reload: the node's
RELOADSETUP, the imaging MFS answer to its next boot question, its receiver's reports
as RELOADING / RELOADDONE / RELOADFAILED.  What needs I/O is here: the image's
session is told to wait for the node's receiver (ImagingService.expect), and a node
that is not waiting in a loader or in iPXE is power-cycled into a network boot
through the power controller (the same one as the API, so a reload of 500 nodes
keeps to power.max_concurrent and power.power_on_rate).  The recovery ladder
(issue 19) brings its own power cycle; this hook stays one call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..lifecycle.core import StartReload
from ..power.core import PowerOp
from ..power.targets import load_targets

log = logging.getLogger("bootherd.imaging")

SOURCE = "reload"


class ReloadActor:
    def __init__(self, live: Any, imaging: Any = None, power: Any = None):
        self.live = live
        self.imaging = imaging  # the ImagingService when it runs in this process
        self.power = power      # the power controller, None when power is not configured

    async def start(self, e: StartReload) -> None:
        if self.imaging is not None:
            self.imaging.expect(e.image)
        if not e.power_cycle:
            return
        why = ""
        if self.power is None:
            why = "no power controller in this server"
        else:
            targets = await asyncio.to_thread(load_targets, self.live.engine, [e.node_id])
            if e.node_id not in targets:
                why = "no power driver in the inventory"
        if why:
            self._note(e.node_id, f"{why}: {e.image} is written at the node's next network boot")
            return
        (res,) = await self.power.run(PowerOp.CYCLE, [e.node_id], pxe=True, source=SOURCE)
        if not res.ok:  # the controller recorded the failed cycle; the watcher times it out
            log.warning("reload %s: power cycle failed: %s", e.node_id, res.message)

    def _note(self, node_id: str, detail: str) -> None:
        state = self.live.states.get(node_id, ("RELOADSETUP", 0.0))[0]
        self.live.record_note(node_id, state, SOURCE, time.time(), detail)
