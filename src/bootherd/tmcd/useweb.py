"""The USEWEB=1 file path of Emulab's install-tarfile and install-rpm.

A node told `USEWEB=1` in its `tarballs` / `rpms` reply fetches each file from

    https://SERVER/spewrpmtar.php3?nodeid=<its node id>&file=<path>&key=<keyhash>
                                  [&stamp=<unix time>][&md5=<hex>]

(`/spewrpmtar` when SERVER starts with "users").  bootherd serves it from its
HTTP files folder, with ranges and admission like every other file, and only:

- to the node itself: the request's source address is the control address of
  the node named by `nodeid` (or of its physical host, for a vnode);
- with the key of the node's experiment (its `keyhash`);
- for a file the node's own `tarballs` or `rpms` reply lists.

`stamp` is the time of the copy the node has: a file not modified since
gets 304 (install-tarfile then keeps its copy).  `md5` is accepted and
ignored, as Emulab's page does.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from aiohttp import web

from ..inventory.model import Node, Snapshot
from ..netaddr import norm_ip

PATHS = ("/spewrpmtar.php3", "/spewrpmtar")


def node_files(snap: Snapshot, node: Node) -> set[str]:
    """The tarball and RPM paths `node` is told about."""
    a = node.allocation
    if a is None:
        return set()
    key = (a.pid, a.eid)
    mine = ("", a.vname)
    return ({p for v, _, p in snap.tarballs.get(key, ()) if v in mine}
            | {p for v, p in snap.rpms.get(key, ()) if v in mine})


def check(snap: Snapshot, remote: str, query: Any) -> tuple[int, str, Node | None]:
    """(status, reason, node): 200 when `remote` may have query['file']."""
    nodeid, file, key = query.get("nodeid", ""), query.get("file", ""), query.get("key", "")
    if not nodeid or not key:
        return 400, "nodeid and key are required", None
    if not file:
        return 400, "you must provide a filename", None
    node = snap.nodes.get(nodeid)
    asker = snap.by_ip.get(norm_ip(remote))
    if node is None or asker is None or asker.node_id not in (node.node_id, node.phys_node_id):
        return 403, "not this node's address", None
    exp = snap.experiment_of(node)
    if exp is None:
        return 400, f"{nodeid} is not reserved to an experiment", None
    if not exp.keyhash:
        return 403, "no key defined for this experiment", None
    if not hmac.compare_digest(key.encode(), exp.keyhash.encode()):
        return 403, "wrong key", None
    if file not in node_files(snap, node):
        return 403, f"{file} is not a file of {nodeid}", None
    return 200, "", node


def add_routes(app: web.Application, live: Any) -> None:
    from ..web.app import STATE_KEY, send_file
    from ..web.files import Refused, resolve_stat

    async def spew(request: web.Request) -> web.StreamResponse:
        st = request.app[STATE_KEY]
        c = st.counters
        c["useweb_requests"] += 1
        status, reason, node = check(live.snapshot, request.remote or "", request.query)
        if status != 200:
            c[f"useweb_{status}"] += 1
            return web.Response(status=status, text=reason + "\n")
        rel = request.query["file"].lstrip("/")
        stamp = request.query.get("stamp", "")
        if stamp.isdigit():
            try:
                _, info = await asyncio.to_thread(resolve_stat, st.files_root, rel)
                mtime: float | None = info.st_mtime
            except (Refused, OSError):
                mtime = None  # send_file answers with the reason
            if mtime is not None and mtime <= int(stamp):
                c["useweb_304"] += 1
                return web.Response(status=304)
        return await send_file(request, st, st.files_root, rel, hashed=True)

    for path in PATHS:
        app.router.add_get(path, spew)
