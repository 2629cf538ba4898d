"""The bootinfo service: core + transport, answering through the lifecycle coordinator."""

from __future__ import annotations

from functools import partial
from typing import Any

from ..lifecycle import Lifecycle, Via
from .core import BootinfoCore
from .server import BootinfoServer, OrderSocket


class BootinfoService:
    name = "bootinfo"

    def __init__(self, config: Any, live: Any, metrics: Any, lifecycle: Lifecycle,
                 orders: OrderSocket):
        core = BootinfoCore(partial(_ask, lifecycle), metrics.protocol("bootinfo"))
        self.server = BootinfoServer(config.bootinfo, core, lambda: live.snapshot, orders,
                                     config.server.public_address,
                                     log_requests="bootinfo" in config.log.requests,
                                     bad_input_interval=config.log.bad_input_interval)
        # What the kernel dropped on the socket only grows: an event, as DHCP's and TFTP's.
        metrics.count("bootinfo", "socket_drops", self.server.socket_drops)

    async def start(self) -> None:
        await self.server.start()  # raises OSError naming the address

    async def stop(self) -> None:
        await self.server.stop()


def _ask(lifecycle: Lifecycle, snap: Any, node: Any, version: int) -> Any:
    return lifecycle.boot_question(snap, node, Via.BOOTINFO, version)
