"""What the console needs from the rest of the process, in one place.

`Backend.from_ctx` is the only code of the console that knows how this process is put
together (today: the service context and the objects services publish in it).  When
the lifecycle coordinator owns operator orders, `send_order` becomes its `order`
and `views` the TMCD views handed to the HTTP service; nothing else changes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ... import policy
from ...inventory import ops
from ...inventory.model import Node, Snapshot


class Unavailable(RuntimeError):
    """The part of the server an action needs does not run in this process."""


OrderFn = Callable[[str, "str | None"], Awaitable[str]]


@dataclass
class Backend:
    config: Any
    live: Any                              # LiveInventory: snapshot, states, on_state
    metrics: Any
    server_name: str
    send_order: OrderFn                    # (node_id, None=AUTO | "REBOOT") -> result line
    views: Callable[[], Any]               # TMCD views (as_json), or raises Unavailable
    services: Callable[[], list[str]]      # what this process runs

    @classmethod
    def from_ctx(cls, ctx: Any, services: Callable[[], list[str]]) -> Backend:
        async def send_order(node_id: str, kind: str | None) -> str:
            # As the admin API's wake and reboot: the bootinfo server's send_order.
            bootinfo = ctx.shared.get("bootinfo")
            send = getattr(bootinfo, "send_order", None)
            if send is None:
                raise Unavailable("the bootinfo service is not running here; cannot send orders")
            res = send(node_id) if kind is None else send(node_id, kind)
            if inspect.isawaitable(res):
                res = await res
            return str(res)

        def views() -> Any:
            try:
                from ...tmcd.http import _views
            except ModuleNotFoundError as e:
                raise Unavailable("TMCD is not part of this build") from e
            return _views(ctx)

        return cls(ctx.config, ctx.live, ctx.metrics, ctx.server_name, send_order, views,
                   services)

    # -- reads --------------------------------------------------------------------

    @property
    def snapshot(self) -> Snapshot:
        return self.live.snapshot

    def decide(self, snap: Snapshot, node: Node) -> policy.BootDecision:
        """What the node's loader would be told if it asked now (nothing is consumed)."""
        return policy.decide_boot(snap, node, self.config)

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
