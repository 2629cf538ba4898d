"""The nodes table: filter, search, sort and page the whole inventory in memory.

Built from the inventory snapshot and the console's view of the node states (no
database): at 10,000 nodes one page costs a pass over the nodes and one sort.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...inventory.model import Snapshot, natural_key
from .feed import PHASES, NodeView

SORTS = ("node", "state", "since", "experiment", "ip", "type", "last")
PER_PAGE = (25, 50, 100, 250, 500)


class BadQuery(ValueError):
    pass


@dataclass(frozen=True)
class Query:
    q: str = ""
    state: str = ""
    phase: str = ""
    experiment: str = ""
    sort: str = "node"
    desc: bool = False
    page: int = 1
    per_page: int = 100

    @classmethod
    def parse(cls, args: Mapping[str, str]) -> Query:
        """From the request's query string; a bad value is refused naming it."""
        sort = args.get("sort", "node") or "node"
        if sort not in SORTS:
            raise BadQuery(f"sort must be one of {', '.join(SORTS)}, not {sort!r}")
        phase = args.get("phase", "")
        if phase and phase not in PHASES:
            raise BadQuery(f"phase must be one of {', '.join(PHASES)}, not {phase!r}")
        try:
            page = int(args.get("page", "1") or "1")
            per_page = int(args.get("per_page", "100") or "100")
        except ValueError:
            raise BadQuery("page and per_page must be whole numbers") from None
        if page < 1:
            raise BadQuery("page must be 1 or more")
        if per_page not in PER_PAGE:
            raise BadQuery(f"per_page must be one of {', '.join(map(str, PER_PAGE))}")
        text = {k: args.get(k, "")[:200] for k in ("q", "state", "experiment")}
        return cls(text["q"].strip(), text["state"].strip().upper(), phase,
                   text["experiment"].strip(), sort, args.get("desc", "") in ("1", "true", "on"),
                   page, per_page)

    def args(self, **change: Any) -> dict[str, str]:
        """The query string of this query with some fields changed (links, sort headers)."""
        d = {"q": self.q, "state": self.state, "phase": self.phase,
             "experiment": self.experiment, "sort": self.sort, "desc": "1" if self.desc else "",
             "page": str(self.page), "per_page": str(self.per_page)}
        d.update({k: ("1" if v is True else "" if v is False else str(v)) for k, v in change.items()})
        return {k: v for k, v in d.items() if v and not (k == "page" and v == "1")
                and not (k == "per_page" and v == "100") and not (k == "sort" and v == "node")}


_order_cache: list[Any] = [None, []]  # [snapshot, its node ids in natural order]


def natural_order(snap: Snapshot) -> list[str]:
    """Node ids in natural order, computed once per snapshot."""
    if _order_cache[0] is not snap:
        _order_cache[:] = [snap, sorted(snap.nodes, key=natural_key)]
    return _order_cache[1]


def _row(snap: Snapshot, nid: str, v: NodeView | None, now: float) -> dict[str, Any]:
    n = snap.nodes[nid]
    a = n.allocation
    v = v or NodeView()
    return {"node_id": nid, "type": n.type, "ip": n.control_ip or "", "mac": n.control_mac or "",
            "experiment": f"{a.pid}/{a.eid}" if a else "", "vname": a.vname if a else "",
            "state": v.state, "since": v.since,
            "seconds": round(now - v.since, 1) if v.since is not None else None,
            "phase": v.phase, "last_ts": v.ts, "last_source": v.source, "last_detail": v.detail}


def run(snap: Snapshot, views: Mapping[str, NodeView], query: Query,
        now: float) -> dict[str, Any]:
    """One page of the table, with the number of nodes that matched."""
    q = query.q.lower()
    out = []
    for nid in natural_order(snap):
        n = snap.nodes[nid]
        v = views.get(nid)
        if query.state and (v.state if v else "") != query.state and not (
                query.state == "UNKNOWN" and not (v and v.state)):
            continue
        if query.phase and (v.phase if v else "idle") != query.phase:
            continue
        a = n.allocation
        exp = f"{a.pid}/{a.eid}" if a else ""
        if query.experiment and exp != query.experiment:
            continue
        if q and not (q in nid.lower() or q in (n.control_ip or "") or q in (n.control_mac or "")
                      or q in exp.lower() or q in n.type.lower()
                      or (a is not None and q in a.vname.lower())):
            continue
        out.append(nid)
    matched = len(out)
    if query.sort != "node" or query.desc:
        key = _sort_key(snap, views, query.sort)
        out.sort(key=key, reverse=query.desc)
    pages = max(1, -(-matched // query.per_page))
    page = min(query.page, pages)
    start = (page - 1) * query.per_page
    rows = [_row(snap, nid, views.get(nid), now) for nid in out[start:start + query.per_page]]
    return {"total": len(snap.nodes), "matched": matched, "page": page, "pages": pages,
            "per_page": query.per_page, "rows": rows}


def _sort_key(snap: Snapshot, views: Mapping[str, NodeView], sort: str) -> Any:
    def view(nid: str) -> NodeView:
        return views.get(nid) or NodeView()

    if sort == "node":
        return natural_key
    if sort == "state":
        return lambda nid: (view(nid).state, natural_key(nid))
    if sort == "since":  # longest in its state first
        return lambda nid: (view(nid).since or float("inf"), natural_key(nid))
    if sort == "last":
        return lambda nid: (-(view(nid).ts or 0.0), natural_key(nid))
    if sort == "experiment":
        def exp(nid: str) -> tuple:
            a = snap.nodes[nid].allocation
            return (0, a.pid, a.eid, natural_key(a.vname)) if a else (1, "", "", natural_key(nid))
        return exp
    if sort == "ip":
        def ip(nid: str) -> tuple:
            addr = snap.nodes[nid].control_ip or ""
            parts = addr.split(".")
            return (tuple(int(p) for p in parts) if len(parts) == 4 and all(
                p.isdigit() for p in parts) else (999,), addr)
        return ip
    return lambda nid: (snap.nodes[nid].type, natural_key(nid))
