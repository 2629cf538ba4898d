"""Where the power controller's inputs come from: BMC targets and node selections.

Read from the database each time an operation runs (one query per batch), so a
changed BMC address or password is used at once and the password never sits in
a long-lived structure such as the snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Engine, and_, select

from ..inventory import schema as s
from ..inventory.model import Snapshot, natural_key
from .core import BmcTarget, select_nodes

_CHUNK = 900  # bound parameters per IN (...), below SQLite's limit


def load_targets(engine: Engine, node_ids: Iterable[str]) -> dict[str, BmcTarget]:
    """node_id -> BmcTarget for the given nodes that have a node_power row."""
    ids = list(node_ids)
    out: dict[str, BmcTarget] = {}
    p, i = s.node_power, s.interfaces
    with engine.connect() as conn:
        for k in range(0, len(ids), _CHUNK):
            chunk = ids[k:k + _CHUNK]
            q = (select(p, i.c.mac).select_from(p.outerjoin(
                i, and_(i.c.node_id == p.c.node_id, i.c.role == "ctrl")))
                .where(p.c.node_id.in_(chunk)))
            for r in conn.execute(q).mappings():
                out[r["node_id"]] = BmcTarget(
                    r["node_id"], r["driver"], r["address"], r["port"], r["user"], r["password"],
                    r["system"], r["console"], r["mac"] or "")
    return out


def console_targets(engine: Engine) -> dict[str, BmcTarget]:
    """Every node with a console to capture."""
    with engine.connect() as conn:
        ids = [r.node_id for r in conn.execute(
            select(s.node_power.c.node_id).where(s.node_power.c.console != ""))]
    return load_targets(engine, ids)


def resolve(snapshot: Snapshot, specs: Iterable[str], everything: bool = False
            ) -> tuple[list[str], list[str]]:
    """Node ids, ranges (pc[1-40]) and pid/eid against a snapshot: (nodes, unknown)."""
    if everything:
        return sorted(snapshot.nodes, key=natural_key), []
    experiments = {k: sorted(v, key=natural_key) for k, v in snapshot.experiment_nodes.items()}
    return select_nodes(specs, snapshot.nodes, experiments)
