"""What the coordinator reads from the inventory: its memory at start, and the
records that confirm a candidate before it is acted on.  Blocking; the runner
calls these in a thread, never on a packet path."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, func, select

from ..inventory import schema as s
from ..power.core import BMC_DRIVERS
from .core import Record, heir

# A server whose heartbeat (every 5 s) is older than this is gone: the nodes it
# handled are taken over.
SERVER_ALIVE_WITHIN = 15.0
_CHUNK = 500  # node ids per IN (...) list
# An operator's power-off (any source but the ladder's own) keeps automation away from
# the node for recovery.operator_hold: it is meant to be off.  An operator's on, cycle
# or reset starts a boot, which the watcher follows like any other (a hung one too):
# one after the off ends its hold.
POWER_HOLDS = ("POWER_OFF", "POWER_SOFT")
POWER_STARTS = ("POWER_ON", "POWER_CYCLE", "POWER_RESET")
AUTOMATION_SOURCES = ("ladder",)


def load(engine: Engine) -> list[dict[str, Any]]:
    """Every node_lifecycle row, for Coordinator.restore."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(s.node_lifecycle))]


def records(engine: Engine, node_ids: Iterable[str], now: float,
            operator_hold: float = 0.0, me: str = "") -> dict[str, Record]:
    """Per node asked: its latest state (None: no row yet), who recorded it, and
    whether that server lives;
    its out-of-service flag and ladder count, its power driver ("" = none), and its
    latest operator power-off within `operator_hold` seconds.  Given `me` (this
    server's name), a node no live server handles gets its heir among the live
    servers and `me`."""
    ids = sorted(set(node_ids))
    t, lc, ev = s.node_states, s.node_lifecycle, s.node_events
    out: dict[str, Record] = {}
    with engine.connect() as conn:
        alive = {r.name for r in conn.execute(select(s.servers.c.name, s.servers.c.heartbeat))
                 if now - r.heartbeat < SERVER_ALIVE_WITHIN}
        heirs = alive | {me} if me else set()
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i:i + _CHUNK]
            life = {r.node_id: r for r in conn.execute(
                select(lc.c.node_id, lc.c.out_of_service, lc.c.power_cycles)
                .where(lc.c.node_id.in_(chunk)))}
            drivers = _drivers(conn, chunk)
            held: dict[str, float] = {}
            if operator_hold > 0:
                held = dict(conn.execute(
                    select(ev.c.node_id, func.max(ev.c.ts))
                    .where(ev.c.node_id.in_(chunk), ev.c.ts > now - operator_hold,
                           ev.c.state.in_(POWER_HOLDS), ev.c.source.not_in(AUTOMATION_SOURCES))
                    .group_by(ev.c.node_id)).all())
            if held:
                started = dict(conn.execute(
                    select(ev.c.node_id, func.max(ev.c.ts))
                    .where(ev.c.node_id.in_(list(held)), ev.c.ts > now - operator_hold,
                           ev.c.state.in_(POWER_STARTS))
                    .group_by(ev.c.node_id)).all())
                held = {n: at for n, at in held.items() if started.get(n, 0.0) < at}
            states = {r.node_id: r for r in conn.execute(
                select(t.c.node_id, t.c.state, t.c.since, t.c.server)
                .where(t.c.node_id.in_(chunk)))}
            for nid in chunk:  # a node with no state row yet still has its flags
                r, lr = states.get(nid), life.get(nid)
                owner_alive = bool(r) and r.server in alive
                out[nid] = Record(r.state if r else None, r.since if r else 0.0,
                                  (r.server or "") if r else "", owner_alive,
                                  lr.out_of_service if lr else "", held.get(nid, 0.0),
                                  lr.power_cycles if lr else None, drivers.get(nid, ""),
                                  heir(heirs, nid) if heirs and not owner_alive else "")
    return out


def _drivers(conn: Any, node_ids: list[str]) -> dict[str, str]:
    p = s.node_power
    return dict(conn.execute(select(p.c.node_id, p.c.driver).where(p.c.node_id.in_(node_ids)))
                .all())


def power_drivers(engine: Engine, node_ids: Iterable[str]) -> dict[str, str]:
    """node_id -> its power driver, "" for the nodes without one."""
    ids = sorted(set(node_ids))
    out = dict.fromkeys(ids, "")
    with engine.connect() as conn:
        for i in range(0, len(ids), _CHUNK):
            out.update(_drivers(conn, ids[i:i + _CHUNK]))
    return out


def power_nodes(engine: Engine) -> list[str]:
    """Nodes whose BMC can report their power state, for power-state sync."""
    p = s.node_power
    with engine.connect() as conn:
        return list(conn.execute(select(p.c.node_id).where(p.c.driver.in_(sorted(BMC_DRIVERS))))
                    .scalars())
