"""What the console needs from the rest of the process, in one place.

`service.wire` builds the one `Backend` of a process and hands it to the console's
routes: the lifecycle coordinator (operator orders, the boot decision), the TMCD
views, the power controller and the console capture, each None when this process
does not run it.  The console's pages and actions use nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ... import policy
from ...inventory import ops
from ...inventory.model import Node, Snapshot


class Unavailable(RuntimeError):
    """The part of the server an action needs does not run in this process."""


@dataclass
class Backend:
    config: Any
    live: Any                    # LiveInventory: snapshot, states, on_state
    metrics: Any
    server_name: str
    lifecycle: Any = None        # the coordinator: order(), bootwhat(), its waiting set
    views: Any = None            # TMCD's Views (as_json), shared with TMCD's HTTP view
    power: Any = None            # the power controller (power.controller)
    consoles: Any = None         # console capture (power.console.ConsoleService)
    services: list[str] = field(default_factory=list)  # what this process runs

    # -- reads --------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self.live.snapshot

    def decide(self, snap: Snapshot, node: Node) -> policy.BootDecision:
        """What the node's loader would be told if it asked now (nothing is consumed:
        the coordinator's TMCD `bootwhat`, which knows a one-shot next_os already served)."""
        if self.lifecycle is not None:
            return self.lifecycle.bootwhat(snap, node)
        return policy.decide_boot(snap, node, self.config)

    def waiting(self, node_id: str) -> str:
        """How the node waits for an order, as the coordinator remembers it ("" if not)."""
        if self.lifecycle is None:
            return ""
        via = self.lifecycle.core.waiting.get(node_id)
        return str(via) if via is not None else ""

    def tmcd_view(self, snap: Snapshot, node: Node) -> dict[str, Any]:
        if self.views is None:
            raise Unavailable("TMCD is not part of this server (neither tmcd nor http runs)")
        return self.views.as_json(snap, node, secrets=False)

    def console(self, node_id: str) -> Any:
        """The node's captured console, or None (not captured here, or none named)."""
        if self.consoles is None:
            return None
        return self.consoles.consoles.get(node_id)

    # -- operator actions ---------------------------------------------------------

    async def order(self, node_id: str, kind: str | None) -> str:
        """An order to the node's waiting loader, through the lifecycle coordinator
        (None: AUTO).  KeyError, ValueError, OSError as `Lifecycle.order`."""
        if self.lifecycle is None:
            raise Unavailable("no lifecycle coordinator in this process; cannot send orders")
        return await self.lifecycle.order(node_id, kind)

    async def reboot(self, node_id: str) -> dict[str, Any]:
        """Reboot the node through the coordinator's recovery ladder, as `POST
        /api/reboot` does: its result (ok, step and detail, or error)."""
        if self.lifecycle is None:
            raise Unavailable("no lifecycle coordinator in this process; cannot reboot")
        (res,) = await self.lifecycle.reboot([node_id], source="ui")
        return res

    def disk_images(self) -> Any:
        """The disk images the inventory records (imaging's ImageStore under imaging.root)."""
        from ...imaging.store import ImageStore  # noqa: PLC0415 - imaging is optional here

        return ImageStore(self.config.path(self.config.imaging.root), self.live.engine)

    async def reload(self, node_id: str, image: str) -> str:
        """Reload the node with a disk image through the coordinator, after the same check
        of the image as `POST /api/reload` (ImageNotFound, ValueError, ImageUnusable);
        KeyError, ValueError (no imaging MFS), OSError as `Lifecycle.reload`."""
        if self.lifecycle is None:
            raise Unavailable("no lifecycle coordinator in this process; cannot reload")
        await asyncio.to_thread(self.disk_images().reloadable, image)
        return await self.lifecycle.reload(node_id, image, source="ui")

    async def db(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """An inventory operation (bootherd.inventory.ops) in a thread."""
        return await asyncio.to_thread(fn, self.live.engine, *args, **kw)

    def read_servers(self) -> list[dict[str, Any]]:
        return ops.servers(self.live.engine)

    def read_start(self, failures: int) -> tuple[dict[str, tuple[str, float, str]],
                                                 list[dict[str, Any]]]:
        """Once at start: who recorded each node's state, and the newest failures."""
        from sqlalchemy import select

        from ...inventory import schema as s
        from ...states import FAILED

        with self.live.engine.connect() as conn:
            known = {r.node_id: (r.state, r.since, r.source)
                     for r in conn.execute(select(s.node_states))}
            failed = sorted(((since, nid, state) for nid, (state, since, _src) in known.items()
                             if state in FAILED), reverse=True)[:failures]
            out = []
            for since, nid, state in failed:
                ev = conn.execute(select(s.node_events).where(
                    s.node_events.c.node_id == nid, s.node_events.c.state == state)
                    .order_by(s.node_events.c.ts.desc()).limit(1)).mappings().first()
                out.append({"node_id": nid, "ts": since, "state": state,
                            "source": ev["source"] if ev else "",
                            "detail": ev["detail"] if ev else ""})
        return known, out
