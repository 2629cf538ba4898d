"""Admin REST API under /api/ (token authenticated), described in openapi.yaml.

Inventory changes go through `bootherd.inventory.ops` (the same functions as
the CLI), run in a thread; running servers see them through the live
snapshot within a poll interval.  Wake orders go through the lifecycle
coordinator (which sends them through the bootinfo transport), reboots through
its recovery ladder (soft step, then a BMC power cycle); power
operations to the power controller, consoles to the console service (all three
handed to the web service by bootherd.service.wire).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

from aiohttp import web

from ..admintoken import app_accepts, app_hint
from .logs import list_logs, read_log

OPENAPI = Path(__file__).with_name("openapi.yaml")
PUBLIC = {"/api/openapi.yaml"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=partial(json.dumps, default=str))


def _error(status: int, msg: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": msg}, status=status, headers=headers)


def _raise(cls: type[web.HTTPException], msg: str, hint: str = "") -> NoReturn:
    """Stop the handler with a JSON error body (and what to do about it, when known)."""
    body = {"error": msg, **({"hint": hint} if hint else {})}
    raise cls(text=json.dumps(body), content_type="application/json") from None


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/api/") or request.path in PUBLIC:
        return await handler(request)
    got = request.headers.get("Authorization", "")
    scheme, _, value = got.partition(" ")
    ok = scheme.lower() == "bearer" and app_accepts(request.app, value.strip())
    if not ok:
        from .app import _state  # noqa: PLC0415 - avoid an import cycle
        _state(request).counters["api_unauthorized"] += 1
        return _error(401, "missing or wrong token (Authorization: Bearer <token>)"
                      + app_hint(request.app),
                      {"WWW-Authenticate": 'Bearer realm="bootherd"'})
    return await handler(request)


def _ctx(request: web.Request) -> Any:
    from .app import _state  # noqa: PLC0415
    return _state(request).ctx


def _lifecycle(request: web.Request) -> Any:
    from .app import _state  # noqa: PLC0415
    return _state(request).lifecycle


def _power(request: web.Request) -> Any:
    from .app import _state  # noqa: PLC0415
    return _state(request).power


def _consoles(request: web.Request) -> Any:
    from .app import _state  # noqa: PLC0415
    return _state(request).consoles


async def _op(request: web.Request, name: str, *args: Any, **kw: Any) -> Any:
    """Run an inventory operation in a thread; map its errors to HTTP."""
    from ..inventory import edit, ops  # noqa: PLC0415

    fn = getattr(edit, name) if name in edit.__all__ else getattr(ops, name)
    try:
        return await asyncio.to_thread(fn, _ctx(request).live.engine, *args, **kw)
    except ops.NotFound as e:
        _raise(web.HTTPNotFound, str(e), e.hint)
    except ops.Conflict as e:
        _raise(web.HTTPConflict, str(e), e.hint)
    except (ValueError, TypeError) as e:
        _raise(web.HTTPBadRequest, str(e))


def _origin(request: web.Request) -> Any:
    """Changes made through the API are audited as origin=api, who=the client's address."""
    from ..inventory.edit import Origin  # noqa: PLC0415

    return Origin("api", request.remote or "")


async def _json_body(request: web.Request) -> Any:
    """The request's JSON, read under http.body_timeout and http.max_api_body; a body
    Python cannot parse safely (a number of millions of digits, arrays nested thousands
    deep) is a 400 like any other bad JSON, never a 500."""
    from .app import _state  # noqa: PLC0415
    from .guard import BodyTimeout, BodyTooLarge, ClientGone, read_body  # noqa: PLC0415

    st = _state(request)
    try:
        raw = await read_body(request, st.body_timeout, st.max_api_body)
    except BodyTooLarge as e:
        raise web.HTTPRequestEntityTooLarge(
            e.limit, text=json.dumps({"error": f"body larger than {e.limit} bytes "
                                               "(http.max_api_body)"}),
            content_type="application/json", headers={"Connection": "close"}) from None
    except BodyTimeout:
        _raise(web.HTTPRequestTimeout,
               f"body not received within {st.body_timeout:g} s (http.body_timeout)")
    except ClientGone:
        _raise(web.HTTPBadRequest, "body incomplete")
    try:
        return json.loads(raw)
    except RecursionError:
        st.counters["api_bad_json"] += 1
        _raise(web.HTTPBadRequest, "body is not valid JSON: nested too deeply")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, int digit limit
        st.counters["api_bad_json"] += 1
        _raise(web.HTTPBadRequest, f"body is not valid JSON: {str(e)[:120]}")


async def _body(request: web.Request, required: tuple[str, ...] = ()) -> dict[str, Any]:
    data = await _json_body(request)
    if not isinstance(data, dict):
        _raise(web.HTTPBadRequest, "body must be a JSON object")
    missing = [k for k in required if not isinstance(data.get(k), str) or not data[k]]
    if missing:
        _raise(web.HTTPBadRequest, f"missing or empty field(s): {', '.join(missing)}")
    return data


async def nodes(request: web.Request) -> web.Response:
    return _json(await _op(request, "list_nodes"))


async def node(request: web.Request) -> web.Response:
    return _json(await _op(request, "show_node", request.match_info["id"]))


async def patch_node(request: web.Request) -> web.Response:
    nid = request.match_info["id"]
    fields = await _body(request)
    if not fields:
        return _error(400, "no fields to set")
    from ..inventory import ops  # noqa: PLC0415

    # Checked here too: a field named like a parameter ("node_id") must not reach **fields.
    settable = ops.SETTABLE | set(ops.MAP_LOADER_FIELDS)
    bad = sorted(set(fields) - set(settable))
    if bad:
        return _error(400, f"cannot set {', '.join(bad)} (settable: {', '.join(sorted(settable))})")
    await _check_boot_files(request, fields)
    await _op(request, "set_node", nid, origin=_origin(request), **fields)
    return _json(await _op(request, "show_node", nid))


async def _check_boot_files(request: web.Request, fields: dict[str, Any]) -> None:
    """An OS image whose kernel file is missing is refused (409) unless ?force=true."""
    if request.query.get("force", "").lower() in ("1", "true", "yes"):
        return
    from ..inventory import ops  # noqa: PLC0415
    from ..inventory.edit import check_boot_files  # noqa: PLC0415

    cfg = _ctx(request).config
    try:
        await asyncio.to_thread(check_boot_files, cfg, _ctx(request).live.engine, fields)
    except ops.NotFound as e:
        _raise(web.HTTPNotFound, str(e), e.hint)
    except ops.Conflict as e:
        _raise(web.HTTPConflict, str(e), e.hint + " (?force=true)")


# The inventory entry by entry: kind -> (collection path, key path parameters).
ENTRY_ROUTES = {"node": "/api/nodes", "user": "/api/users", "group": "/api/groups",
                "os": "/api/os-images", "type": "/api/node-types",
                "experiment": "/api/experiments"}


def _key(request: web.Request, kind: str) -> str:
    m = request.match_info
    if kind == "experiment":
        return f"{m['pid']}/{m['eid']}"
    return m["id"] if kind == "node" else m["key"]


def _changes(changes: list[Any]) -> web.Response:
    return _json({"changes": [{**c.as_dict(), "text": c.describe()} for c in changes]})


def _entry_handlers(kind: str) -> dict[str, Any]:
    async def listing(request: web.Request) -> web.Response:
        return _json(await _op(request, "entries", kind))

    async def add(request: web.Request) -> web.Response:
        entry = await _body(request)
        from ..inventory.edit import KINDS  # noqa: PLC0415

        if kind == "node":
            await _check_boot_files(request, entry)
        res = await _op(request, "add", kind, entry, _origin(request))
        key = KINDS[kind].key_of({k: entry.get(k, "") for k in KINDS[kind].keys})
        return _json({"key": key, "changes": [c.describe() for c in res]}, status=201)

    async def change(request: web.Request) -> web.Response:
        fields = await _body(request)
        if not fields:
            return _error(400, "no fields to set")
        return _changes(await _op(request, "change", kind, _key(request, kind), fields,
                                  _origin(request)))

    async def remove(request: web.Request) -> web.Response:
        force = request.query.get("force", "").lower() in ("1", "true", "yes")
        return _changes(await _op(request, "remove", kind, _key(request, kind),
                                  _origin(request), force=force))

    return {"list": listing, "add": add, "change": change, "remove": remove}


async def add_interface(request: web.Request) -> web.Response:
    entry = await _body(request, ("mac",))
    res = await _op(request, "add_interface", request.match_info["id"], entry, _origin(request))
    return _json({"key": entry["mac"], "changes": [c.describe() for c in res]}, status=201)


async def change_interface(request: web.Request) -> web.Response:
    fields = await _body(request)
    if not fields:
        return _error(400, "no fields to set")
    return _changes(await _op(request, "change_interface", request.match_info["mac"], fields,
                              _origin(request)))


async def remove_interface(request: web.Request) -> web.Response:
    return _changes(await _op(request, "remove_interface", request.match_info["mac"],
                              _origin(request)))


async def node_events(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return _error(400, "limit must be a whole number")
    nid = request.match_info["id"]
    if nid not in _ctx(request).live.snapshot.nodes:
        await _op(request, "show_node", nid)  # 404 unless created since the snapshot
    return _json(await _op(request, "node_events", nid, limit=max(1, min(limit, 10000))))


async def node_logs(request: web.Request) -> web.Response:
    nid = request.match_info["id"]
    cfg = _ctx(request).config
    try:
        logs = await asyncio.to_thread(list_logs, cfg, nid, True)
    except ValueError as e:
        return _error(400, str(e))
    return _json([li.as_dict() for li in logs])


async def node_log(request: web.Request) -> web.Response:
    nid, which = request.match_info["id"], request.match_info["which"]
    try:
        text = await asyncio.to_thread(read_log, _ctx(request).config, nid, which)
    except LookupError as e:
        return _error(404, str(e))
    except ValueError as e:
        return _error(400, str(e))
    return web.Response(text=text, content_type="text/plain")


async def _order(request: web.Request, order: str | None) -> web.Response:
    ctx = _ctx(request)
    nid = request.match_info["id"]
    if nid not in ctx.live.snapshot.nodes:
        return _error(404, f"no node {nid!r}")
    lifecycle = _lifecycle(request)
    if lifecycle is None:
        return _error(503, "no lifecycle coordinator in this process; cannot send orders")
    try:
        res = await lifecycle.order(nid, order)
    except (LookupError, ValueError) as e:
        return _error(409, str(e.args[0] if e.args else e))
    except OSError as e:  # no bootinfo transport running here
        return _error(503, f"cannot send order: {e}")
    return _json({"node_id": nid, "order": order or "WAKE", "result": res}, status=202)


async def wake(request: web.Request) -> web.Response:
    """AUTO by default; a JSON body {"order": "AUTO" | "REBOOT" | "RESTART"} picks another."""
    order = None
    if request.can_read_body:
        body = await _body(request)
        order = body.get("order")
        if order is not None and not isinstance(order, str):
            return _error(400, "order must be a string: AUTO, REBOOT or RESTART")
    return await _order(request, order)


async def _reboot(request: web.Request, specs: list[str], single: bool = False) -> web.Response:
    """Reboot nodes through the coordinator's recovery ladder (soft step first, then
    a BMC power cycle, until the node is up or given up); one result per node."""
    from ..power.targets import resolve  # noqa: PLC0415

    lifecycle = _lifecycle(request)
    if lifecycle is None:
        return _error(503, "no lifecycle coordinator in this process; cannot reboot")
    try:
        nodes, unknown = resolve(_ctx(request).live.snapshot, specs)
    except ValueError as e:
        return _error(400, str(e.args[0] if e.args else e))
    if unknown:
        return _error(404, f"no such node(s): {', '.join(unknown)}")
    results = await lifecycle.reboot(nodes, source="operator")
    if single and not results[0]["ok"]:
        return _error(409, results[0]["error"])
    return _json({"results": results}, status=202)


async def reboot(request: web.Request) -> web.Response:
    """One node: 409 with the reason when it cannot be rebooted."""
    return await _reboot(request, [request.match_info["id"]], single=True)


async def reboot_many(request: web.Request) -> web.Response:
    """{"nodes": [ids, ranges (pc[1-40]) or pid/eid]}."""
    specs = (await _body(request)).get("nodes")
    if not isinstance(specs, list) or not specs or not all(isinstance(x, str) for x in specs):
        return _error(400, "nodes: a non-empty list of node ids, ranges (pc[1-40]) or pid/eid")
    return await _reboot(request, specs)


async def free(request: web.Request) -> web.Response:
    nid = request.match_info["id"]
    await _op(request, "free", nid, origin=_origin(request))
    return _json({"node_id": nid, "allocated": False})


async def experiments(request: web.Request) -> web.Response:
    return _json(await _op(request, "list_experiments"))


async def create_experiment(request: web.Request) -> web.Response:
    b = await _body(request, ("pid", "eid", "creator"))
    await _op(request, "create_experiment", b["pid"], b["eid"], b["creator"],
              b.get("swapper") or None, origin=_origin(request))
    return _json({"pid": b["pid"], "eid": b["eid"]}, status=201)


async def allocate(request: web.Request) -> web.Response:
    pid, eid = request.match_info["pid"], request.match_info["eid"]
    b = await _body(request, ("node_id", "vname"))
    await _op(request, "allocate", pid, eid, b["node_id"], b["vname"], origin=_origin(request))
    return _json({"pid": pid, "eid": eid, "node_id": b["node_id"], "vname": b["vname"]},
                 status=201)


async def states(request: web.Request) -> web.Response:
    live = _ctx(request).live
    counts = Counter(live.states[n][0] if n in live.states else "UNKNOWN"
                     for n in live.snapshot.nodes)
    return _json({"nodes": len(live.snapshot.nodes), "states": dict(sorted(counts.items()))})


_SOURCE = re.compile(r"^[a-z][a-z0-9-]{0,15}$")


async def power(request: web.Request) -> web.StreamResponse:
    """Run one power operation on many nodes; the results stream as NDJSON lines."""
    from ..power.core import PowerOp  # noqa: PLC0415
    from ..power.targets import resolve  # noqa: PLC0415

    ctx = _ctx(request)
    ctl = _power(request)
    if ctl is None:
        return _error(503, "power control is not running in this server")
    b = await _body(request, ("op",))
    try:
        op = PowerOp(b["op"])
    except ValueError:
        return _error(400, f"op must be one of {', '.join(o.value for o in PowerOp)}, "
                           f"not {b['op']!r}")
    specs, everything = b.get("nodes", []), b.get("all", False)
    pxe, source = b.get("pxe", False), b.get("source", "api")
    if not isinstance(specs, list) or not all(isinstance(x, str) for x in specs) \
            or not isinstance(everything, bool) or not isinstance(pxe, bool):
        return _error(400, "nodes must be a list of strings, all and pxe true or false")
    if not isinstance(source, str) or not _SOURCE.match(source):
        return _error(400, "source must be a short lower-case word (it names the caller "
                           "in node events)")
    if not specs and not everything:
        return _error(400, "name nodes (ids, ranges like pc[1-40], pid/eid) or set all")
    try:
        nodes, unknown = resolve(ctx.live.snapshot, specs, everything)
    except ValueError as e:
        return _error(400, str(e))
    if pxe and op not in (PowerOp.ON, PowerOp.CYCLE, PowerOp.RESET):
        return _error(400, f"pxe goes with on, cycle or reset, not {op}")
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    lines: asyncio.Queue = asyncio.Queue()
    head = {"type": "start", "op": str(op), "nodes": len(nodes), "unknown": unknown,
            "max_concurrent": ctl.settings.max_concurrent,
            "power_on_rate": ctl.settings.power_on_rate}
    await resp.write((json.dumps(head) + "\n").encode())
    job = asyncio.ensure_future(ctl.run(op, nodes, pxe=pxe, source=source,
                                              on_result=lines.put_nowait))
    job.add_done_callback(lambda _: lines.put_nowait(None))
    ok = failed = 0
    try:
        while (res := await lines.get()) is not None:
            ok, failed = ok + res.ok, failed + (not res.ok)
            await resp.write((json.dumps({"type": "result", **res.as_dict()}) + "\n").encode())
        job.result()  # a controller bug surfaces here, after the results it did give
        await resp.write((json.dumps({"type": "done", "ok": ok, "failed": failed,
                                      "unknown": len(unknown)}) + "\n").encode())
        await resp.write_eof()
    except (ConnectionResetError, asyncio.CancelledError):
        job.cancel()  # the caller went away: nodes not yet started are not started
        raise
    return resp


async def node_power(request: web.Request) -> web.Response:
    """The power state of one node, asked of its BMC now."""
    from ..power.core import PowerOp  # noqa: PLC0415

    ctx = _ctx(request)
    nid = request.match_info["id"]
    if nid not in ctx.live.snapshot.nodes:
        return _error(404, f"no node {nid!r}")
    ctl = _power(request)
    if ctl is None:
        return _error(503, "power control is not running in this server")
    (res,) = await ctl.run(PowerOp.STATUS, [nid], source="api")
    return _json(res.as_dict())


async def consoles(request: web.Request) -> web.Response:
    svc = _consoles(request)
    if svc is None:
        return _error(503, "console capture is not running in this server (console.enabled)")
    return _json([c.status() for c in svc.consoles.values()])


async def console_attach(request: web.Request) -> web.StreamResponse:
    """Websocket onto a node's console: binary frames both ways; text frames are
    JSON notices.  ?write=1 asks to write; one writer at a time, others read."""
    nid = request.match_info["id"]
    svc = _consoles(request)
    if svc is None:
        return _error(503, "console capture is not running in this server (console.enabled)")
    con = svc.consoles.get(nid)
    if con is None:
        return _error(404, f"{nid} has no console in the inventory (or it is not captured here)")
    ws = web.WebSocketResponse(heartbeat=30)
    await ws.prepare(request)
    who = f"{request.remote or '?'} ({request.query.get('who', 'operator')[:40]})"
    att = con.attach(who, request.query.get("write", "") in ("1", "true", "yes"))
    holder = con.writer.who if con.writer else ""
    await ws.send_json({"type": "attached", "node_id": nid, "write": att.can_write,
                        "writer": holder, "connected": con.link is not None,
                        "error": con.last_error})
    backlog = con.log.tail()
    if backlog:
        await ws.send_bytes(backlog)

    async def pump() -> None:
        while (data := await att.queue.get()):
            await ws.send_bytes(data)
        await ws.close()

    out = asyncio.ensure_future(pump())
    try:
        async for msg in ws:
            if msg.type == web.WSMsgType.BINARY:
                if not await con.send(att, msg.data):
                    await ws.send_json({"type": "read-only", "writer": con.writer.who
                                        if con.writer else "", "connected": con.link is not None})
    finally:
        con.detach(att)
        out.cancel()
    return ws


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/yaml")


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/openapi.yaml", openapi)
    r.add_get("/api/nodes", nodes)
    r.add_get("/api/nodes/{id}", node)
    r.add_patch("/api/nodes/{id}", patch_node)
    r.add_get("/api/nodes/{id}/events", node_events)
    r.add_get("/api/nodes/{id}/logs", node_logs)
    r.add_get("/api/nodes/{id}/logs/{which}", node_log)
    r.add_post("/api/nodes/{id}/wake", wake)
    r.add_post("/api/nodes/{id}/reboot", reboot)
    r.add_post("/api/reboot", reboot_many)
    r.add_post("/api/nodes/{id}/free", free)
    r.add_get("/api/experiments", experiments)
    r.add_post("/api/experiments", create_experiment)
    for kind, path in ENTRY_ROUTES.items():
        h = _entry_handlers(kind)
        item = path + {"experiment": "/{pid}/{eid}", "node": "/{id}"}.get(kind, "/{key}")
        if kind not in ("node", "experiment"):  # those two have their own list and add
            r.add_get(path, h["list"])
            r.add_post(path, h["add"])
            r.add_patch(item, h["change"])
        elif kind == "node":
            r.add_post(path, h["add"])
        else:
            r.add_patch(item, h["change"])
        r.add_delete(item, h["remove"])
    r.add_post("/api/nodes/{id}/interfaces", add_interface)
    r.add_patch("/api/interfaces/{mac}", change_interface)
    r.add_delete("/api/interfaces/{mac}", remove_interface)
    r.add_post("/api/experiments/{pid}/{eid}/allocate", allocate)
    r.add_get("/api/states", states)
    r.add_post("/api/power", power)
    r.add_get("/api/nodes/{id}/power", node_power)
    r.add_get("/api/nodes/{id}/console", console_attach)
    r.add_get("/api/consoles", consoles)
