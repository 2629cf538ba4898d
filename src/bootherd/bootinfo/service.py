"""`create_service(ctx)`: the bootinfo server plus the node state watcher.

The state watcher runs once per process; bootinfo starts it because the
watcher's main remedy (re-sending an order) goes through bootinfo.  It is kept
in ctx.shared["states_watcher"] so nobody starts a second one.
"""

from __future__ import annotations

from typing import Any

from ..states import ensure_watcher
from .server import BootinfoServer


class BootinfoService:
    name = "bootinfo"

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.server = BootinfoServer(ctx)
        self.watcher = ensure_watcher(ctx)

    async def start(self) -> None:
        await self.server.start()  # raises OSError naming the address
        self.ctx.shared["bootinfo"] = self.server
        await self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()
        if self.ctx.shared.get("bootinfo") is self.server:
            del self.ctx.shared["bootinfo"]
        await self.server.stop()
        await self.server.decider.drain()


def create_service(ctx: Any) -> BootinfoService:
    return BootinfoService(ctx)
