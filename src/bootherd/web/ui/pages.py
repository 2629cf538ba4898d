"""The console's pages, its update stream and its actions: an aiohttp sub-application.

Every page needs a session (see session.py); a request without one is sent to the
sign-in form, a forged or expired one gets 401 and the form again.  Errors are pages
with a status and a sentence, never a traceback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from ...cli import _duration as duration
from ...inventory import ops
from ..logs import CONSOLE, list_console_logs, list_logs, read_log
from . import actions as act
from . import nodes as table
from .backend import Backend, Unavailable
from .feed import KEEPALIVE, PHASES, RECENT_FAILURES, Feed, sse
from .session import (
    COOKIE,
    COOKIE_PATH,
    Session,
    SessionRefused,
    Sessions,
    SignInGuard,
    csrf_ok,
    same_origin,
    token_ok,
)
from .terminal import TerminalText, clean, printable

log = logging.getLogger("bootherd.web.ui")

HERE = Path(__file__).parent
UI_KEY = web.AppKey("bootherd_console", object)
SESSION_KEY = web.RequestKey("bootherd_console_session", object)
EVENTS_SHOWN = 200          # newest events on a node page
LOG_TAIL = 64 * 1024        # bytes of the newest log shown inline
CONSOLE_TAIL = 16 * 1024    # bytes of the captured console shown when a node page opens

# No inline script or style, nothing from elsewhere, never framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminToken:
    """The admin token as the HTTP application holds it: its TokenCheck, which follows
    `bootherd token rotate` (the token file is read again when it changes), or a fixed
    string (an application built without a configuration)."""

    def __init__(self, app: web.Application):
        self.check = app.get("admin_token_check")
        self.fixed = str(app.get("admin_token") or "")

    def current(self) -> str:
        return self.check.current() if self.check is not None else self.fixed

    def hint(self) -> str:
        return self.check.hint() if self.check is not None else "http.admin_token"


class ConsoleState:
    """Everything the console's handlers share; one per process."""

    def __init__(self, backend: Backend, admin_token: AdminToken, counters: Counter):
        cfg = backend.config.ui
        self.backend = backend
        self.admin_token = admin_token
        self.token_in_use = admin_token.current()  # the token the live sessions signed in with
        self.read_only = bool(cfg.read_only)
        self.https_port = int(backend.config.http.tls_port)
        self.sessions = Sessions(float(cfg.session_lifetime))
        self.guard = SignInGuard()
        self.counters = counters
        self.feed = Feed(backend.live, float(cfg.update_interval), backend.read_servers, counters)
        # Open console followers: attachment -> the session it belongs to (sign-out ends them).
        self.console_streams: dict[Any, str] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
            lstrip_blocks=True)
        self.env.filters["when"] = _when
        self.env.filters["ago"] = lambda s: duration(s) or "-"  # as `bootherd node list`
        self.env.globals["qs"] = lambda d: urlencode(d)

    def check(self, sid: str | None, now: float) -> Session:
        """The request's session (SessionRefused if none); after a token rotation every
        session signed in with the old token has ended."""
        self.follow_rotation(now)
        return self.sessions.check(sid, now)

    def follow_rotation(self, now: float) -> None:
        token = self.admin_token.current()
        if token == self.token_in_use:
            return
        self.token_in_use = token
        ended = self.sessions.end_all(now)
        for sub in list(self.feed.subs):
            sub.close()
        for att in list(self.console_streams):
            _end_attachment(att)
        self.counters["sessions_ended_by_rotation"] += ended
        log.warning("admin token changed: %d console sessions ended", ended)

    def render(self, request: web.Request, template: str, status: int = 200,
               **values: Any) -> web.Response:
        s: Session | None = request.get(SESSION_KEY)
        html = self.env.get_template(template).render(
            server=self.backend.server_name, session=s, read_only=self.read_only,
            csrf=s.csrf if s else "", interval=self.feed.interval, phases=PHASES,
            path=request.path, now=time.time(), **values)
        return web.Response(text=html, status=status, content_type="text/html",
                            charset="utf-8")

    def error(self, request: web.Request, status: int, title: str, message: str) -> web.Response:
        if _wants_json(request):
            return web.json_response({"error": message}, status=status)
        return self.render(request, "error.html", status=status, title=title, message=message)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _ui(request: web.Request) -> ConsoleState:
    return request.app[UI_KEY]  # type: ignore[return-value]


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "") \
        or request.path.endswith(".json")


# -- errors and headers ---------------------------------------------------------------

_REASONS = {404: ("Not found", "There is no such page in the console."),
            405: ("Method not allowed", "This page does not take that kind of request."),
            413: ("Too large", "That request is too large.")}


def _https_only(request: web.Request, ui: ConsoleState) -> web.Response | None:
    """With HTTPS served, the console is not used over plain HTTP: the token would be
    typed in the clear.  A page is sent to HTTPS; anything else is refused."""
    if not ui.https_port or request.secure:
        return None
    if request.method in ("GET", "HEAD"):
        host = request.url.host or "localhost"
        if ":" in host:
            host = f"[{host}]"
        return web.Response(status=308, headers={
            "Location": f"https://{host}:{ui.https_port}{request.path_qs}"})
    return ui.error(request, 403, "Use HTTPS",
                    f"This server serves the console over HTTPS (port {ui.https_port}); "
                    f"nothing is accepted from it over plain HTTP.")


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ui = _ui(request)
    try:
        resp = _https_only(request, ui) or await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            resp = web.Response(status=e.status, headers=e.headers)  # a redirect
        else:
            title, msg = _REASONS.get(e.status, (e.reason, e.reason))
            resp = ui.error(request, e.status, title, msg)
    except _NoNode as e:
        resp = ui.error(request, 404, "No such node",
                        f"There is no node {e.nid!r} in the inventory.")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:  # noqa: BLE001 - a page, never a traceback; the log has it
        log.exception("console request failed: %s %s", request.method, request.path_qs)
        ui.counters["ui_errors"] += 1
        resp = ui.error(request, 500, "Internal error",
                        "The server could not answer this request; its log has the details.")
    if not resp.prepared:
        for k, v in SECURITY_HEADERS.items():
            if request.path.startswith("/ui/static/") and k == "Cache-Control":
                continue
            resp.headers.setdefault(k, v)
    return resp


# -- sign-in --------------------------------------------------------------------------

def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _safe_next(target: str | None) -> str:
    """Only a console path: never another site (//host, scheme:) or a header break."""
    if not target or not target.startswith("/ui/") or target.startswith("//") \
            or any(c in target for c in "\r\n\\"):
        return "/ui/"
    return target


def _refuse_session(request: web.Request, e: SessionRefused) -> web.StreamResponse:
    ui = _ui(request)
    ui.counters[f"session_{e.kind}"] += 1
    stream = request.path.endswith("/events")  # an EventSource, not a page
    if e.kind == "missing" and request.method == "GET" and not _wants_json(request) \
            and not stream:
        raise web.HTTPSeeOther("/ui/login?" + urlencode({"next": request.path_qs}))
    if _wants_json(request) or stream:
        resp: web.Response = web.json_response(
            {"error": str(e), "signin": "/ui/login"}, status=401)
    else:
        resp = ui.render(request, "login.html", status=401, message=str(e),
                         next=_safe_next(request.path_qs if request.method == "GET" else "/ui/"))
    if e.kind != "missing":
        resp.del_cookie(COOKIE, path=COOKIE_PATH)
    return resp


def signed_in(handler: Handler) -> Handler:
    async def check(request: web.Request) -> web.StreamResponse:
        ui = _ui(request)
        try:
            request[SESSION_KEY] = ui.check(request.cookies.get(COOKIE), time.time())
        except SessionRefused as e:
            return _refuse_session(request, e)
        return await handler(request)
    return check


def _origin_refusal(request: web.Request) -> str | None:
    return same_origin(request.headers, request.host, request.scheme)


async def login_form(request: web.Request) -> web.Response:
    ui = _ui(request)
    try:
        ui.check(request.cookies.get(COOKIE), time.time())
        raise web.HTTPSeeOther(_safe_next(request.query.get("next")))
    except SessionRefused:
        pass
    return ui.render(request, "login.html", message="", next=_safe_next(request.query.get("next")))


async def login(request: web.Request) -> web.Response:
    ui = _ui(request)
    now = time.time()
    why = _origin_refusal(request)
    if why:
        ui.counters["cross_site_refused"] += 1
        return ui.error(request, 403, "Refused", f"Sign-in {why}.")
    form = await request.post()
    target = _safe_next(str(form.get("next", "")))
    addr = request.remote or ""
    wait = ui.guard.retry_after(addr, now)
    if wait:
        ui.counters["sign_in_throttled"] += 1
        resp = ui.render(request, "login.html", status=429, next=target,
                         message=f"Too many wrong tokens from {addr}; try again in "
                                 f"{int(wait) + 1} s.")
        resp.headers["Retry-After"] = str(int(wait) + 1)
        return resp
    token = form.get("token", "")
    ui.follow_rotation(now)
    if not isinstance(token, str) or not token_ok(ui.token_in_use, token.strip()):
        ui.guard.failed(addr, now)
        ui.counters["sign_in_refused"] += 1
        log.warning("console sign-in refused from %s", addr)
        return ui.render(request, "login.html", status=401, next=target,
                         message=f"That is not the admin token (it is "
                                 f"{ui.admin_token.hint()}).")
    ui.guard.succeeded(addr)
    s = ui.sessions.create(now, addr)
    ui.counters["sign_ins"] += 1
    log.info("console sign-in from %s", addr)
    resp = _see_other(target)
    resp.set_cookie(COOKIE, s.sid, path=COOKIE_PATH, httponly=True, samesite="Strict",
                    secure=request.secure, max_age=int(ui.sessions.lifetime))
    return resp


async def logout(request: web.Request) -> web.StreamResponse:
    ui = _ui(request)
    why = _origin_refusal(request)
    if why:
        ui.counters["cross_site_refused"] += 1
        return ui.error(request, 403, "Refused", f"Sign-out {why}.")
    sid = request.cookies.get(COOKIE)
    form = await request.post()
    try:
        s = ui.check(sid, time.time())
    except SessionRefused:
        s = None
    if s is not None:
        if not csrf_ok(s, str(form.get("csrf", ""))):
            return ui.error(request, 403, "Refused", "Sign-out without the page's CSRF token.")
        for sub in list(ui.feed.subs):
            if sub.sid == s.sid:
                sub.close()
        for att, sid in list(ui.console_streams.items()):
            if sid == s.sid:
                _end_attachment(att)
        ui.sessions.end(s.sid, time.time())
    resp = _see_other("/ui/login")
    resp.del_cookie(COOKIE, path=COOKIE_PATH)
    return resp


# -- pages ------------------------------------------------------------------------------

@signed_in
async def overview(request: web.Request) -> web.Response:
    ui = _ui(request)
    core = ui.feed.core
    assert core is not None
    return ui.render(request, "overview.html", page="overview", hello=core.hello(time.time()),
                     services=ui.backend.services)


@signed_in
async def storm(request: web.Request) -> web.Response:
    ui = _ui(request)
    core = ui.feed.core
    assert core is not None
    return ui.render(request, "storm.html", page="storm", hello=core.hello(time.time()))


def _node_query(request: web.Request) -> tuple[table.Query | None, str]:
    try:
        return table.Query.parse(request.query), ""
    except table.BadQuery as e:
        return None, str(e)


@signed_in
async def nodes_page(request: web.Request) -> web.Response:
    ui = _ui(request)
    q, bad = _node_query(request)
    if q is None:
        return ui.error(request, 400, "Bad query", bad)
    core = ui.feed.core
    assert core is not None
    snap = ui.backend.snapshot
    res = table.run(snap, core.nodes, q, time.time())
    states = sorted({v.state for v in core.nodes.values() if v.state})
    exps = sorted(f"{p}/{e}" for p, e in snap.experiments)
    return ui.render(request, "nodes.html", page="nodes", q=q, res=res, states=states,
                     experiments=exps, sorts=table.SORTS, per_pages=table.PER_PAGE)


@signed_in
async def nodes_json(request: web.Request) -> web.Response:
    ui = _ui(request)
    q, bad = _node_query(request)
    if q is None:
        return web.json_response({"error": bad}, status=400)
    core = ui.feed.core
    assert core is not None
    return web.json_response(table.run(ui.backend.snapshot, core.nodes, q, time.time()))


class _NoNode(Exception):
    """The request names a node the inventory lacks: a 404 page (console_middleware)."""

    def __init__(self, nid: str):
        super().__init__(nid)
        self.nid = nid


def _node_or_404(request: web.Request) -> Any:
    nid = request.match_info["id"]
    node = _ui(request).backend.snapshot.nodes.get(nid)
    if node is None:
        raise _NoNode(nid)
    return node


def _decision(ui: ConsoleState, snap: Any, node: Any) -> dict[str, Any]:
    d = ui.backend.decide(snap, node)
    details = {k: v for k, v in (("partition", d.partition), ("disk", d.disk),
                                 ("sysid", d.sysid), ("server", d.server), ("path", d.path),
                                 ("initrd", d.initrd), ("cmdline", d.cmdline))
               if v not in (None, "")}
    return {"type": d.type.name, "image": d.image, "reason": d.reason, "boots": d.boots,
            "one_shot": d.consumes_next_os, "details": details}


def _tmcd_view(ui: ConsoleState, snap: Any, node: Any) -> tuple[dict[str, Any] | None, str]:
    try:
        return ui.backend.tmcd_view(snap, node), ""
    except Unavailable as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - one node's view must not take the page down
        log.exception("TMCD view of %s failed", node.node_id)
        return None, f"the TMCD view could not be built: {type(e).__name__}"


def _console_panel(ui: ConsoleState, nid: str, power: dict[str, Any] | None) -> dict[str, Any]:
    """The node's serial console: captured here (status, live), or only its stored log
    (captured by another server on this host, or earlier)."""
    con = ui.backend.console(nid)
    if con is not None:
        tail = con.log.tail(CONSOLE_TAIL)
    else:
        try:
            tail = read_log(ui.backend.config, nid, CONSOLE).encode()[-CONSOLE_TAIL:]
        except (LookupError, ValueError, OSError):
            tail = b""
    return {"setting": (power or {}).get("console") or "",
            "status": con.status() if con is not None else None,
            "capturing": ui.backend.consoles is not None,
            "text": printable(tail), "logs": list_console_logs(ui.backend.config, nid)}


def _node_reads(ui: ConsoleState, nid: str) -> tuple[dict[str, Any], list[dict[str, Any]],
                                                      list[Any], str, str, dict[str, Any]]:
    """The parts of a node page that live in the database and on disk (one thread)."""
    engine = ui.backend.live.engine
    cfg = ui.backend.config
    shown = ops.show_node(engine, nid)
    events = ops.node_events(engine, nid, limit=EVENTS_SHOWN)
    logs = list_logs(cfg, nid)
    newest, newest_name = "", ""
    if logs:
        newest_name = logs[-1].name
        try:
            newest = read_log(cfg, nid, newest_name)
        except (LookupError, ValueError, OSError, UnicodeDecodeError) as e:
            newest = f"(cannot read {newest_name}: {e})"
        if len(newest) > LOG_TAIL:
            newest = "[... earlier part cut; open the log for all of it]\n" + newest[-LOG_TAIL:]
    return shown, events, logs, newest, newest_name, _console_panel(ui, nid, shown.get("power"))


@signed_in
async def node_page(request: web.Request) -> web.Response:
    ui = _ui(request)
    node = _node_or_404(request)
    snap = ui.backend.snapshot
    core = ui.feed.core
    assert core is not None
    try:
        shown, events, logs, newest, newest_name, console = await asyncio.to_thread(
            _node_reads, ui, node.node_id)
    except ops.NotFound:  # removed since the snapshot
        raise _NoNode(node.node_id) from None
    view = core.nodes.get(node.node_id)
    # The writer commits in batches: add what is recorded but not in the database yet.
    seen = {(e["ts"], e["state"], e["source"]) for e in events}
    events += [e for e in ui.feed.events_of(node.node_id)
               if (e["ts"], e["state"], e["source"]) not in seen]
    events.sort(key=lambda e: e["ts"])
    events = events[-EVENTS_SHOWN:]
    tmcd, tmcd_error = _tmcd_view(ui, snap, node)
    offered = []
    for a in act.listed():
        choices = await asyncio.to_thread(a.choices, ui.backend, node) if a.choices else None
        offered.append({"action": a, "choices": choices,
                        "why_not": a.available(ui.backend) or a.for_node(shown)
                        or (a.no_choices if choices == [] else None),
                        "confirm": a.confirm.format(node=node.node_id)})
    return ui.render(request, "node.html", page="node", node=node, view=view,
                     shown=shown, events=list(reversed(events)), logs=list(reversed(logs)),
                     newest=newest, newest_name=newest_name, decision=_decision(ui, snap, node),
                     tmcd=tmcd, tmcd_error=tmcd_error, actions=offered, console=console,
                     waiting=ui.backend.waiting(node.node_id))


@signed_in
async def node_decision(request: web.Request) -> web.Response:
    """The boot-decision panel alone: the node page refreshes it when the inventory changes."""
    ui = _ui(request)
    node = _node_or_404(request)
    snap = ui.backend.snapshot
    return ui.render(request, "decision.html", node=node, decision=_decision(ui, snap, node),
                     generation=snap.generation)


@signed_in
async def node_log(request: web.Request) -> web.Response:
    ui = _ui(request)
    node = _node_or_404(request)
    which = request.match_info["which"]
    try:
        text = await asyncio.to_thread(read_log, ui.backend.config, node.node_id, which)
    except LookupError as e:
        return ui.error(request, 404, "No such log", str(e))
    except ValueError as e:
        return ui.error(request, 400, "Bad log name", str(e))
    if which == CONSOLE or which.startswith(CONSOLE + "."):
        text = clean(text)  # written for a terminal: no escape sequences on a page
    return ui.render(request, "log.html", page="log", node=node, name=which, text=text)


# -- actions ------------------------------------------------------------------------------

async def action(request: web.Request) -> web.StreamResponse:
    """POST /ui/nodes/{id}/actions/{name}: site, session, CSRF token, then the action."""
    ui = _ui(request)
    c = ui.counters
    why = _origin_refusal(request)
    if why:
        c["cross_site_refused"] += 1
        return ui.error(request, 403, "Refused", f"Action {why}: actions are taken only from "
                                                 f"this console's own pages.")
    try:
        s = request[SESSION_KEY] = ui.check(request.cookies.get(COOKIE), time.time())
    except SessionRefused as e:
        c["action_refused_session"] += 1
        return _refuse_session(request, e)
    if ui.read_only:
        c["action_refused_read_only"] += 1
        return ui.error(request, 403, "Read-only console",
                        "This console is read-only (ui.read_only); actions are switched off.")
    form = await request.post()
    given = request.headers.get("X-CSRF-Token") or str(form.get("csrf", ""))
    if not csrf_ok(s, given):
        c["csrf_refused"] += 1
        return ui.error(request, 403, "Refused",
                        "The request lacks this session's CSRF token; reload the page and "
                        "try again.")
    node = _node_or_404(request)
    name = request.match_info["name"]
    a = act.ACTIONS.get(name)
    if a is None:
        return ui.error(request, 404, "No such action",
                        f"There is no action {name!r} (there are: "
                        f"{', '.join(x.name for x in act.listed())}).")
    value = str(form.get("value", ""))
    if not form.get("confirmed") and not _wants_json(request):
        # No script ran the confirmation: ask on a page of its own.
        return ui.render(request, "confirm.html", node=node, action=a, value=value,
                         question=a.confirm.format(node=node.node_id))
    why_not = a.available(ui.backend)
    if why_not:
        return ui.error(request, 503, "Not available here", why_not)
    try:
        result = await a.run(ui.backend, node.node_id, value)
    except act.ActionRefused as e:
        c["action_failed"] += 1
        log.info("console action %s on %s refused: %s", name, node.node_id, e)
        return ui.error(request, e.status, f"{a.label} refused", str(e))
    c["actions"] += 1
    log.info("console action %s on %s from %s: %s", name, node.node_id, request.remote, result)
    if _wants_json(request):
        return web.json_response({"node_id": node.node_id, "action": name, "value": value,
                                  "result": result})
    return ui.render(request, "result.html", node=node, action=a, result=result)


# -- the update stream -------------------------------------------------------------------

async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: `hello` (all), `tick` (what changed), `node` (the watched
    node's events).  Ends when the session does."""
    ui = _ui(request)
    try:
        s = ui.check(request.cookies.get(COOKIE), time.time())
    except SessionRefused as e:
        return _refuse_session(request, e)
    node_id = request.query.get("node") or None
    if node_id is not None and node_id not in ui.backend.snapshot.nodes:
        return web.json_response({"error": f"no node {node_id!r}"}, status=404)
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        return web.json_response({"error": "since must be a number (seconds)"}, status=400)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    sub, hello = ui.feed.subscribe(node_id, since)
    sub.sid = s.sid  # sign-out ends its streams
    try:
        await resp.write(b"retry: 2000\n" + hello)
        while True:
            data = await sub.next(KEEPALIVE)
            if data is None:
                break
            if time.time() >= s.expires:
                await resp.write(b'event: signedout\ndata: {"error": "session expired"}\n\n')
                break
            if not data:
                ui.follow_rotation(time.time())  # a new token ends this stream (closed)
            await resp.write(data or b": keepalive\n\n")
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        ui.feed.unsubscribe(sub)
    return resp


def _end_attachment(att: Any) -> None:
    """Make a console follower's stream end (b"" is the end, as when capture stops)."""
    while True:
        try:
            att.queue.put_nowait(b"")
            return
        except asyncio.QueueFull:
            att.queue.get_nowait()


async def console_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events of one node's serial console as text: `backlog` (the newest
    part of its log, replacing what the page shows), then `text` as it is printed;
    `closed` when capture stops.  Read-only: typing goes through the admin API's
    websocket (`bootherd node console`)."""
    ui = _ui(request)
    try:
        s = ui.check(request.cookies.get(COOKIE), time.time())
    except SessionRefused as e:
        return _refuse_session(request, e)
    nid = request.match_info["id"]
    if nid not in ui.backend.snapshot.nodes:
        return web.json_response({"error": f"no node {nid!r}"}, status=404)
    con = ui.backend.console(nid)
    if con is None:
        return web.json_response({"error": f"{nid}'s console is not captured by this server "
                                           "(console.enabled, and a console in the inventory)"},
                                 status=404)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    term = TerminalText()
    # The tail, then the attachment, with no await between: nothing lost, nothing twice.
    backlog = term.feed(con.log.tail(CONSOLE_TAIL))
    att = con.attach(f"{request.remote or '?'} (web console)", False)
    ui.console_streams[att] = s.sid
    ui.counters["console_followers"] += 1
    try:
        await resp.write(b"retry: 2000\n" + sse("backlog", {"text": backlog,
                                                             "status": con.status()}))
        while True:
            try:
                data = await asyncio.wait_for(att.queue.get(), KEEPALIVE)
            except TimeoutError:
                ui.follow_rotation(time.time())
                if time.time() >= s.expires or s.sid not in ui.sessions:
                    await resp.write(b'event: signedout\ndata: {"error": "session expired"}\n\n')
                    break
                await resp.write(b": keepalive\n\n")
                continue
            while data and not att.queue.empty():
                more = att.queue.get_nowait()
                if not more:
                    data = b""  # the end came behind this output: show it, then end
                    break
                data += more
            if data:
                text = term.feed(data)
                if text:
                    await resp.write(sse("text", {"text": text}))
                continue
            await resp.write(sse("closed", {"status": con.status()}))
            break
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        con.detach(att)
        ui.console_streams.pop(att, None)
    return resp


# -- wiring --------------------------------------------------------------------------------

async def _redirect_home(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


async def _not_found(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()


def add_routes(app: web.Application, backend: Backend) -> ConsoleState | None:
    """Mount the console under /ui/ of `app` (unless ui.enabled is false); it signs in
    with the admin token the application was built with."""
    if not backend.config.ui.enabled:
        return None
    ui = ConsoleState(backend, AdminToken(app), backend.metrics.protocol("ui"))
    sub = web.Application(middlewares=[console_middleware])
    sub[UI_KEY] = ui
    r = sub.router
    r.add_get("/", overview)
    r.add_get("/storm", storm)
    r.add_get("/nodes", nodes_page)
    r.add_get("/nodes.json", nodes_json)
    r.add_get("/nodes/{id}", node_page)
    r.add_get("/nodes/{id}/decision", node_decision)
    r.add_get("/nodes/{id}/logs/{which}", node_log)
    r.add_get("/nodes/{id}/console/events", console_events)
    r.add_post("/nodes/{id}/actions/{name}", action)
    r.add_get("/events", events)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    static = r.add_static("/static/", HERE / "static", name="static", append_version=True)
    ui.env.globals["static"] = lambda name: str(static.url_for(filename=name))
    r.add_route("*", "/{tail:.*}", _not_found)
    app.add_subapp("/ui", sub)
    app.router.add_get("/ui", _redirect_home)
    app.router.add_get("/", _redirect_home)

    m = backend.metrics
    m.gauge("ui_consoles", lambda: len(ui.feed.subs))
    m.gauge("ui_sessions", lambda: len(ui.sessions))
    m.gauge("ui_updates", lambda: ui.feed.ticks)
    m.gauge("ui_update_seconds", lambda: ui.feed.tick_seconds)

    async def start(_app: web.Application) -> None:
        known, failures = await asyncio.to_thread(backend.read_start, RECENT_FAILURES)
        await ui.feed.start(known, failures)

    async def stop(_app: web.Application) -> None:
        for att in list(ui.console_streams):
            _end_attachment(att)
        await ui.feed.stop()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return ui
