"""What the coordinator reads from the inventory: its memory at start, and the
records that confirm a candidate before it is acted on.  Blocking; the runner
calls these in a thread, never on a packet path."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, select

from ..inventory import schema as s
from .core import Record

# A server whose heartbeat (every 5 s) is older than this is gone: the nodes it
# handled are taken over.
SERVER_ALIVE_WITHIN = 15.0
_CHUNK = 500  # node ids per IN (...) list


def load(engine: Engine) -> list[dict[str, Any]]:
    """Every node_lifecycle row, for Coordinator.restore."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(s.node_lifecycle))]


def records(engine: Engine, node_ids: Iterable[str], now: float) -> dict[str, Record]:
    """The latest state of each node, who recorded it, and whether that server lives."""
    ids = sorted(set(node_ids))
    t = s.node_states
    out: dict[str, Record] = {}
    with engine.connect() as conn:
        alive = {r.name for r in conn.execute(select(s.servers.c.name, s.servers.c.heartbeat))
                 if now - r.heartbeat < SERVER_ALIVE_WITHIN}
        for i in range(0, len(ids), _CHUNK):
            rows = conn.execute(select(t.c.node_id, t.c.state, t.c.since, t.c.server)
                                .where(t.c.node_id.in_(ids[i:i + _CHUNK])))
            for r in rows:
                out[r.node_id] = Record(r.state, r.since, r.server or "", r.server in alive)
    return out
