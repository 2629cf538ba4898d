"""The HTTP/JSON view of TMCD data.

GET /config                       the requesting node's configuration (by source
                                  address; secrets included: HTTP runs on TCP)
GET /api/nodes/{node_id}/config   any node's configuration, for admins
                                  (`Authorization: Bearer <app["admin_token"]>`)
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..admintoken import app_accepts
from ..netaddr import connection_local_ip, norm_ip
from .views import Views


def add_routes(app: web.Application, live: Any, metrics: Any, views: Views) -> None:
    """`views`: the process's one Views, shared with the TMCD server (one render cache)."""
    counters = metrics.protocol("tmcd")

    async def own_config(request: web.Request) -> web.Response:
        counters["http_requests"] += 1
        snap = live.snapshot
        node = snap.by_ip.get(norm_ip(request.remote or ""))
        if node is None:
            counters["http_unknown_node"] += 1
            raise web.HTTPNotFound(text="unknown node\n")
        here = connection_local_ip(request.transport)
        return web.json_response(views.as_json(snap, node, secrets=True, server=here))

    async def node_config(request: web.Request) -> web.Response:
        counters["http_requests"] += 1
        auth = request.headers.get("Authorization", "")
        given = auth[7:] if auth.startswith("Bearer ") else ""
        if not app_accepts(app, given):
            counters["http_unauthorized"] += 1
            raise web.HTTPUnauthorized(text="admin token required\n",
                                       headers={"WWW-Authenticate": "Bearer"})
        snap = live.snapshot
        node = snap.nodes.get(request.match_info["node_id"])
        if node is None:
            raise web.HTTPNotFound(text="no such node\n")
        return web.json_response(views.as_json(snap, node, secrets=True))

    app.router.add_get("/config", own_config)
    app.router.add_get("/api/nodes/{node_id}/config", node_config)
