"""Operator actions on the inventory, shared by the CLI and the admin API.

Each is one short transaction; the change triggers bump the generation, so
running servers pick the change up without a restart.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, update

from ..firmware import MAP_SLOTS
from . import schema as s
from .model import natural_key
from .testbed import loaders_from_db


class NotFound(ValueError):
    """No such entry; `hint` says how to make one (the CLI prints it after the message)."""

    def __init__(self, msg: str, hint: str = ""):
        super().__init__(msg)
        self.hint = hint


class Conflict(ValueError):
    """The change contradicts the inventory; `hint` says what to do instead."""

    def __init__(self, msg: str, hint: str = ""):
        super().__init__(msg)
        self.hint = hint


# Node fields an operator may set; the value "" clears a nullable one.
SETTABLE = {"type", "role", "default_os", "temp_os", "next_os", "pxe_loader", "boot_cmdline",
            "loader_bios", "loader_uefi", "loader_http", "loader_ipxe", "bios_disk", "privkey"}
_NULLABLE = {"default_os", "temp_os", "next_os", "bios_disk", "privkey"}
# Every other loader slot is settable the same way (loader_uefi-arm64=...): those live in
# the node's `loaders` map.
MAP_LOADER_FIELDS = {f"loader_{slot}": slot for slot in MAP_SLOTS}


def list_nodes(engine: Engine) -> list[dict[str, Any]]:
    now = time.time()
    with engine.connect() as conn:
        ctrl = {r.node_id: (r.mac, r.ip) for r in conn.execute(
            select(s.interfaces).where(s.interfaces.c.role == "ctrl"))}
        alloc = {r.node_id: r for r in conn.execute(select(s.allocations))}
        states = {r.node_id: r for r in conn.execute(select(s.node_states))}
        out = []
        for r in conn.execute(select(s.nodes)):
            a, st = alloc.get(r.node_id), states.get(r.node_id)
            mac, ip = ctrl.get(r.node_id, ("", ""))
            out.append({
                "node_id": r.node_id, "type": r.type, "role": r.role,
                "mac": mac, "ip": ip or "",
                "experiment": f"{a.pid}/{a.eid}" if a else "", "vname": a.vname if a else "",
                "state": st.state if st else "", "since": st.since if st else None,
                "state_seconds": round(now - st.since, 1) if st else None,
                "default_os": r.default_os or "",
            })
    out.sort(key=lambda n: natural_key(n["node_id"]))
    return out


def show_node(engine: Engine, node_id: str) -> dict[str, Any]:
    with engine.connect() as conn:
        r = conn.execute(select(s.nodes).where(s.nodes.c.node_id == node_id)).mappings().first()
        if r is None:
            raise _missing("node", node_id)
        node = dict(r)
        node["loaders"] = loaders_from_db(node.get("loaders"))
        node["interfaces"] = [dict(i) for i in conn.execute(
            select(s.interfaces).where(s.interfaces.c.node_id == node_id)
            .order_by(s.interfaces.c.iface)).mappings()]
        a = conn.execute(select(s.allocations).where(s.allocations.c.node_id == node_id)) \
            .mappings().first()
        node["allocation"] = dict(a) if a else None
        st = conn.execute(select(s.node_states).where(s.node_states.c.node_id == node_id)) \
            .mappings().first()
        node["state"] = dict(st) if st else None
        lease = conn.execute(select(s.leases).where(s.leases.c.node_id == node_id)).mappings().all()
        node["leases"] = [dict(x) for x in lease]
        pw = conn.execute(select(s.node_power).where(s.node_power.c.node_id == node_id)) \
            .mappings().first()
        node["power"] = power_view(pw) if pw else None
    return node


def power_view(row: Any) -> dict[str, Any]:
    """A node's power settings as shown to operators: the password only as set or not."""
    out = {k: row[k] for k in ("driver", "address", "port", "user", "system", "console")}
    out["password_set"] = bool(row["password"])
    return out


def set_node(engine: Engine, node_id: str, origin: Any = None, **fields: Any) -> None:
    """Change settable fields of a node with import's rules (inventory.edit.change).
    Text values (from the command line) are taken as the field's type; "" clears a
    field that may be empty."""
    from .edit import Origin, change, coerce
    from .testbed import NODE_FIELDS, NULLABLE

    bad = set(fields) - SETTABLE - set(MAP_LOADER_FIELDS)
    if bad:
        raise ValueError(f"cannot set {', '.join(sorted(bad))} (settable: {', '.join(sorted(SETTABLE))}"
                         ", and loader_<slot> for every slot of bootherd.firmware)")
    values: dict[str, Any] = {}
    for k, v in fields.items():
        if k in MAP_LOADER_FIELDS:
            v = str(v or "")  # "" clears the slot (edit.change merges slots into loaders)
        elif v is None or v == "" and k in NULLABLE:
            v = NULLABLE.get(k, "")
        elif isinstance(v, str):
            v = coerce(NODE_FIELDS, k, v)
        values[k] = v
    change(engine, "node", node_id, values, origin or Origin.cli())


def list_experiments(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        counts = dict(conn.execute(
            select(s.allocations.c.pid + "/" + s.allocations.c.eid, func.count())
            .group_by(s.allocations.c.pid, s.allocations.c.eid)).all())
        return [{"pid": r.pid, "eid": r.eid, "creator": r.creator, "swapper": r.swapper,
                 "nodes": counts.get(f"{r.pid}/{r.eid}", 0)}
                for r in conn.execute(select(s.experiments).order_by(s.experiments.c.pid,
                                                                     s.experiments.c.eid))]


def _audit(conn: Any, origin: Any, action: str, kind: str, key: str, detail: str = "") -> None:
    from .edit import Origin, audit

    audit(conn, origin or Origin.cli(), action, kind, key, detail)


def _missing(kind: str, key: str) -> NotFound:
    from .edit import missing

    return missing(kind, key)


def create_experiment(engine: Engine, pid: str, eid: str, creator: str,
                      swapper: str | None = None, origin: Any = None) -> None:
    with engine.begin() as conn:
        for who in {creator, swapper or creator}:
            if conn.execute(select(s.users.c.login).where(s.users.c.login == who)).first() is None:
                raise _missing("user", who)
        if conn.execute(select(s.experiments.c.pid).where(
                s.experiments.c.pid == pid, s.experiments.c.eid == eid)).first() is not None:
            raise Conflict(f"experiment {pid}/{eid} exists")
        group = conn.execute(select(s.groups.c.name).where(s.groups.c.name == pid)).scalar()
        conn.execute(insert(s.experiments).values(pid=pid, eid=eid, creator=creator,
                                                  swapper=swapper or creator, gid=group))
        conn.execute(insert(s.experiment_members).values(pid=pid, eid=eid, login=creator, root=True))
        _audit(conn, origin, "add", "experiment", f"{pid}/{eid}", f"creator {creator}")


def allocate(engine: Engine, pid: str, eid: str, node_id: str, vname: str,
             origin: Any = None) -> None:
    with engine.begin() as conn:
        if conn.execute(select(s.experiments.c.pid).where(
                s.experiments.c.pid == pid, s.experiments.c.eid == eid)).first() is None:
            raise _missing("experiment", f"{pid}/{eid}")
        if conn.execute(select(s.nodes.c.node_id).where(s.nodes.c.node_id == node_id)).first() is None:
            raise _missing("node", node_id)
        cur = conn.execute(select(s.allocations).where(s.allocations.c.node_id == node_id)).first()
        if cur is not None:
            raise Conflict(f"node {node_id} is allocated to {cur.pid}/{cur.eid}",
                           f"free it first with 'bootherd experiment free {node_id}'")
        if conn.execute(select(s.allocations.c.node_id).where(
                s.allocations.c.pid == pid, s.allocations.c.eid == eid,
                s.allocations.c.vname == vname)).first() is not None:
            raise Conflict(f"{pid}/{eid} already has a node named {vname!r}",
                           "give it another name: NODE:OTHERNAME")
        conn.execute(insert(s.allocations).values(node_id=node_id, pid=pid, eid=eid, vname=vname))
        _audit(conn, origin, "allocate", "node", node_id, f"to {pid}/{eid} as {vname}")


def free(engine: Engine, node_id: str, origin: Any = None) -> None:
    with engine.begin() as conn:
        n = conn.execute(delete(s.allocations).where(s.allocations.c.node_id == node_id)).rowcount
        if n == 0:
            if conn.execute(select(s.nodes.c.node_id).where(
                    s.nodes.c.node_id == node_id)).first() is None:
                raise _missing("node", node_id)
            raise NotFound(f"node {node_id!r} is not allocated")
        _audit(conn, origin, "free", "node", node_id)


def node_events(engine: Engine, node_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """A node's state history, oldest first.  NotFound for a node the inventory does not
    have and never had events for (a removed node's history is still shown)."""
    with engine.connect() as conn:
        rows = conn.execute(select(s.node_events).where(s.node_events.c.node_id == node_id)
                            .order_by(s.node_events.c.ts.desc(), s.node_events.c.id.desc())
                            .limit(limit)).mappings().all()
        if not rows and conn.execute(select(s.nodes.c.node_id).where(
                s.nodes.c.node_id == node_id)).first() is None:
            raise _missing("node", node_id)
    return [dict(r) for r in reversed(rows)]


def servers(engine: Engine) -> list[dict[str, Any]]:
    now = time.time()
    with engine.connect() as conn:
        return [{**dict(r), "age": round(now - r["heartbeat"], 1)}
                for r in conn.execute(select(s.servers).order_by(s.servers.c.name)).mappings()]


def set_service(engine: Engine, node_id: str, reason: str, source: str = "cli") -> None:
    """Take a node out of service (`reason`) or back in (""), as the recovery ladder
    does when it gives up; back in service, its ladder budget is whole.  A line in the
    node's history either way.  (A running server reads the flag from here.)"""
    lc = s.node_lifecycle
    now = time.time()
    values = ({"out_of_service": reason[:1000], "out_since": now, "out_by": source[:64]}
              if reason else {"out_of_service": "", "out_since": 0.0, "out_by": "",
                              "power_cycles": 0})
    with engine.begin() as conn:
        if conn.execute(select(s.nodes.c.node_id).where(s.nodes.c.node_id == node_id)).first() \
                is None:
            raise NotFound(f"no node {node_id!r}")
        done = conn.execute(update(lc).where(lc.c.node_id == node_id)
                            .values(updated=now, **values)).rowcount
        if not done:
            conn.execute(insert(lc).values(node_id=node_id, updated=now, **values))
        conn.execute(insert(s.node_events).values(
            node_id=node_id, ts=now, state="OUT_OF_SERVICE" if reason else "IN_SERVICE",
            source=source[:16], detail=reason or "back in service"))


def out_of_service(engine: Engine) -> list[dict[str, Any]]:
    """The nodes taken out of service, with why, when and by whom."""
    lc = s.node_lifecycle
    with engine.connect() as conn:
        rows = conn.execute(select(lc.c.node_id, lc.c.out_of_service, lc.c.out_since,
                                   lc.c.out_by).where(lc.c.out_of_service != "")).mappings()
        return sorted((dict(r) for r in rows), key=lambda r: natural_key(r["node_id"]))
