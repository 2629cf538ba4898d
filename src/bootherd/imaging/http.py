"""HTTP routes of imaging, handed to bootherd's web app by `service.wire`.

- ``GET/HEAD /images/NAME``: the image file with ranges, through the same file sending
  and admission control as /files (receivers' HTTP fallback, and their index).
- ``POST /images/NAME/progress``: a receiver's progress report (JSON).
- ``GET /api/images``, ``GET /api/images/NAME``, ``GET /api/imaging/sessions``: the
  catalog and the running sessions with their receivers (admin token).
- ``POST /api/reload`` ``{"nodes": [...], "image": NAME}``: reload nodes (ids, ranges,
  pid/eid) with a disk image, through the lifecycle coordinator (admin token).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .store import SUFFIX, ImageNotFound, ImageStore, ImageUnusable, check_name

REPORT_FIELDS = {"image": str, "state": str, "done_chunks": int, "chunks": int,
                 "bytes_written": int, "via": str, "receiver": int, "message": str}


def add_routes(app: web.Application, config: Any, live: Any, imaging: Any = None,
               lifecycle: Any = None) -> None:
    """`imaging`: the ImagingService when this process runs one (progress, sessions);
    `lifecycle`: the coordinator reloads go through."""
    from ..web.app import _state, send_file  # noqa: PLC0415 - web imports us lazily

    root = config.path(config.imaging.root)

    async def image_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        try:
            check_name(name)
        except ValueError as e:
            return web.Response(status=404, text=f"{e}\n")
        return await send_file(request, _state(request), root, name + SUFFIX, hashed=False)

    async def progress(request: web.Request) -> web.Response:
        svc = imaging
        if svc is None:
            return web.json_response({"error": "imaging service is not running here"},
                                     status=503)
        try:
            body = json.loads(await request.content.read(4096))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "body is not valid JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        clean = {}
        for k, t in REPORT_FIELDS.items():
            if k in body:
                if not isinstance(body[k], t) or isinstance(body[k], bool):
                    return web.json_response({"error": f"{k}: expected {t.__name__}"}, status=400)
                clean[k] = body[k][:200] if isinstance(body[k], str) else body[k]
        clean["image"] = request.match_info["name"]
        ip = request.remote or ""
        if ip.startswith("::ffff:"):
            ip = ip[7:]
        node = live.snapshot.by_ip.get(ip)
        svc.report(ip, node.node_id if node else None, clean)
        return web.json_response({"recorded": True, "node_id": node.node_id if node else None})

    def _store() -> ImageStore:
        return ImageStore(root, live.engine)

    async def images(request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(_store().list))

    async def image(request: web.Request) -> web.Response:
        try:
            return web.json_response(await asyncio.to_thread(_store().show,
                                                             request.match_info["name"]))
        except (ImageNotFound, ValueError) as e:
            return web.json_response({"error": str(e.args[0] if e.args else e)}, status=404)

    async def sessions(request: web.Request) -> web.Response:
        svc = imaging
        if svc is None:
            return web.json_response({"error": "imaging service is not running here"},
                                     status=503)
        return web.json_response({"sessions": svc.sessions(), "ended": svc.ended,
                                  "reports": list(svc.reports.values())})

    async def reload(request: web.Request) -> web.Response:
        from ..power.targets import resolve  # noqa: PLC0415

        if lifecycle is None:
            return web.json_response({"error": "no lifecycle coordinator in this process"},
                                     status=503)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"error": "body is not valid JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        specs, name = body.get("nodes"), body.get("image")
        if not isinstance(specs, list) or not specs or not all(isinstance(x, str) for x in specs):
            return web.json_response({"error": "nodes: a non-empty list of node ids, ranges "
                                               "(pc[1-40]) or pid/eid"}, status=400)
        if not isinstance(name, str) or not name:
            return web.json_response({"error": "image: the name of a disk image"}, status=400)
        try:
            await asyncio.to_thread(_store().reloadable, name)
            nodes, unknown = resolve(live.snapshot, specs)
        except ImageUnusable as e:
            return web.json_response({"error": str(e)}, status=409)
        except (ImageNotFound, ValueError) as e:
            return web.json_response({"error": str(e.args[0] if e.args else e)}, status=400)
        if unknown:
            return web.json_response({"error": f"no such node(s): {', '.join(unknown)}"},
                                     status=404)
        results = []
        for nid in nodes:
            try:
                results.append({"node_id": nid, "ok": True,
                                "result": await lifecycle.reload(nid, name)})
            except ValueError as e:  # no imaging MFS configured: the same for every node
                return web.json_response({"error": str(e)}, status=409)
            except (KeyError, OSError) as e:
                results.append({"node_id": nid, "ok": False,
                                "result": str(e.args[0] if e.args else e)})
        return web.json_response({"image": name, "results": results}, status=202)

    app.router.add_get("/images/{name}", image_file)  # GET and HEAD
    app.router.add_post("/images/{name}/progress", progress)
    app.router.add_get("/api/images", images)
    app.router.add_get("/api/images/{name}", image)
    app.router.add_get("/api/imaging/sessions", sessions)
    app.router.add_post("/api/reload", reload)
