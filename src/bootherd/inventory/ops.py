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
from .testbed import LOADER_PATH_MAX, loaders_from_db, loaders_to_db


class NotFound(ValueError):
    pass


class Conflict(ValueError):
    pass


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
            raise NotFound(f"no node {node_id!r}")
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


def set_node(engine: Engine, node_id: str, **fields: Any) -> None:
    bad = set(fields) - SETTABLE - set(MAP_LOADER_FIELDS)
    if bad:
        raise ValueError(f"cannot set {', '.join(sorted(bad))} (settable: {', '.join(sorted(SETTABLE))}"
                         ", and loader_<slot> for every slot of bootherd.firmware)")
    values: dict[str, Any] = {}
    slots = {MAP_LOADER_FIELDS[k]: str(v or "") for k, v in fields.items() if k in MAP_LOADER_FIELDS}
    for slot, path in slots.items():
        if len(path) > LOADER_PATH_MAX or "\0" in path:
            raise ValueError(f"loader_{slot}: not a loader path")
    for k, v in fields.items():
        if k in MAP_LOADER_FIELDS:
            continue
        if k in _NULLABLE and v in ("", None):
            v = None
        elif k == "bios_disk":
            v = int(v)
        values[k] = v
    with engine.begin() as conn:
        for k in ("default_os", "temp_os", "next_os"):
            if values.get(k) and conn.execute(
                    select(s.os_images.c.name).where(s.os_images.c.name == values[k])).first() is None:
                raise NotFound(f"{k}: no OS image {values[k]!r}")
        if "type" in values and conn.execute(
                select(s.node_types.c.name).where(s.node_types.c.name == values["type"])).first() is None:
            raise NotFound(f"type: no node type {values['type']!r}")
        if slots:
            cur = conn.execute(select(s.nodes.c.loaders).where(s.nodes.c.node_id == node_id)).first()
            if cur is None:
                raise NotFound(f"no node {node_id!r}")
            merged = {**loaders_from_db(cur[0]), **slots}
            values["loaders"] = loaders_to_db({k: v for k, v in merged.items() if v})
        n = conn.execute(update(s.nodes).where(s.nodes.c.node_id == node_id).values(**values)).rowcount
        if n == 0:
            raise NotFound(f"no node {node_id!r}")


def list_experiments(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        counts = dict(conn.execute(
            select(s.allocations.c.pid + "/" + s.allocations.c.eid, func.count())
            .group_by(s.allocations.c.pid, s.allocations.c.eid)).all())
        return [{"pid": r.pid, "eid": r.eid, "creator": r.creator, "swapper": r.swapper,
                 "nodes": counts.get(f"{r.pid}/{r.eid}", 0)}
                for r in conn.execute(select(s.experiments).order_by(s.experiments.c.pid,
                                                                     s.experiments.c.eid))]


def create_experiment(engine: Engine, pid: str, eid: str, creator: str,
                      swapper: str | None = None) -> None:
    with engine.begin() as conn:
        for who in {creator, swapper or creator}:
            if conn.execute(select(s.users.c.login).where(s.users.c.login == who)).first() is None:
                raise NotFound(f"no user {who!r}")
        if conn.execute(select(s.experiments.c.pid).where(
                s.experiments.c.pid == pid, s.experiments.c.eid == eid)).first() is not None:
            raise Conflict(f"experiment {pid}/{eid} exists")
        group = conn.execute(select(s.groups.c.name).where(s.groups.c.name == pid)).scalar()
        conn.execute(insert(s.experiments).values(pid=pid, eid=eid, creator=creator,
                                                  swapper=swapper or creator, gid=group))
        conn.execute(insert(s.experiment_members).values(pid=pid, eid=eid, login=creator, root=True))


def allocate(engine: Engine, pid: str, eid: str, node_id: str, vname: str) -> None:
    with engine.begin() as conn:
        if conn.execute(select(s.experiments.c.pid).where(
                s.experiments.c.pid == pid, s.experiments.c.eid == eid)).first() is None:
            raise NotFound(f"no experiment {pid}/{eid}")
        if conn.execute(select(s.nodes.c.node_id).where(s.nodes.c.node_id == node_id)).first() is None:
            raise NotFound(f"no node {node_id!r}")
        cur = conn.execute(select(s.allocations).where(s.allocations.c.node_id == node_id)).first()
        if cur is not None:
            raise Conflict(f"node {node_id} is allocated to {cur.pid}/{cur.eid}")
        if conn.execute(select(s.allocations.c.node_id).where(
                s.allocations.c.pid == pid, s.allocations.c.eid == eid,
                s.allocations.c.vname == vname)).first() is not None:
            raise Conflict(f"{pid}/{eid} already has a node named {vname!r}")
        conn.execute(insert(s.allocations).values(node_id=node_id, pid=pid, eid=eid, vname=vname))


def free(engine: Engine, node_id: str) -> None:
    with engine.begin() as conn:
        n = conn.execute(delete(s.allocations).where(s.allocations.c.node_id == node_id)).rowcount
        if n == 0:
            raise NotFound(f"node {node_id!r} is not allocated")


def node_events(engine: Engine, node_id: str, limit: int = 100) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(s.node_events).where(s.node_events.c.node_id == node_id)
                            .order_by(s.node_events.c.ts.desc(), s.node_events.c.id.desc())
                            .limit(limit)).mappings().all()
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
