"""The aiohttp application: files, boot loaders, node logs, health, metrics.

The admin API lives in api.py; routes of other packages (iPXE scripts, TMCD
JSON) are handed to `build_app` by whoever wires the process (bootherd.service).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..loaders import SystemLoaders
from ..logs import RateLimited
from ..netaddr import norm_ip
from . import api
from .files import STATS as SENDFILE_STATS
from .files import Admission, Hasher, PlainFileResponse, Refused, digest_headers, not_modified, resolve_stat
from .guard import BodyTimeout, BodyTooLarge, ClientGone, read_chunks
from .logs import LogStore, LogTooLarge

log = logging.getLogger("bootherd.web")

# Adds routes of another package to the application.
Routes = Callable[[web.Application], None]

STATE_KEY = web.AppKey("bootherd_web", object)


class WebState:
    """Everything the handlers share; one per application."""

    def __init__(self, ctx: Any, hasher: Hasher, lifecycle: Any, services: list[str],
                 power: Any = None, consoles: Any = None):
        cfg = ctx.config
        h = cfg.http
        self.ctx = ctx
        self.lifecycle = lifecycle  # operator actions (wake, reboot) go through it
        self.services = services    # what this process runs, for /health
        self.power = power          # the power controller (the lifecycle's too)
        self.consoles = consoles    # console capture, when it runs in this process
        self.files_root = cfg.path(h.root)
        self.boot_root = cfg.path(cfg.tftp.root)
        self.system_loaders = SystemLoaders(self.boot_root, cfg.tftp.system_loaders)
        self.large = int(h.large_file_bytes)
        self.retry_after = int(h.retry_after)
        self.stall_timeout = h.stall_timeout
        self.admission = Admission(int(h.max_large_transfers),
                                   h.max_queued_transfers,
                                   h.queue_timeout)
        self.hasher = hasher
        self.logs = LogStore(cfg.path(h.log_dir), int(h.max_log_bytes), int(h.logs_per_node))
        self.counters: Counter = ctx.metrics.protocol("http")
        self.started = time.time()
        self.body_timeout = float(h.body_timeout)
        self.max_api_body = int(h.max_api_body)
        self.uploads = UploadSlots(int(h.max_uploads), int(h.max_uploads_per_node))
        # Bad input (broken uploads, malformed requests): one log line per source per interval.
        self.bad_input = RateLimited(log, cfg.log.bad_input_interval)


def _state(request: web.Request) -> WebState:
    return request.app[STATE_KEY]  # type: ignore[return-value]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def count_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    c = _state(request).counters
    c["requests"] += 1
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        c[f"status_{e.status // 100}xx"] += 1
        raise
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError too
        c["aborted"] += 1  # the client went away while we answered: not our error
        raise
    except Exception:  # noqa: BLE001 - counted, then aiohttp answers 500
        c["status_5xx"] += 1
        c["errors"] += 1
        log.exception("request failed: %s %s", request.method, request.path_qs)
        raise
    c[f"status_{resp.status // 100}xx"] += 1
    if isinstance(resp, PlainFileResponse):
        pass  # counted by send_file: sendfile bypasses aiohttp's byte counter
    elif resp.prepared:
        c["bytes_sent"] += resp.body_length
    elif isinstance(resp, web.Response) and resp.body is not None:
        c["bytes_sent"] += len(resp.body)  # type: ignore[arg-type]
    return resp


def _text(status: int, msg: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=msg.rstrip("\n") + "\n", headers=headers)


def _file_handler(which: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        st = _state(request)
        rel = request.match_info["path"]
        if which == "boot":
            # A loader the root lacks, from the package that installs it (bootherd.loaders).
            src = st.system_loaders.path(rel)
            if src is not None:
                return await send_file(request, st, src.parent, src.name, hashed=False)
        root = st.files_root if which == "files" else st.boot_root
        return await send_file(request, st, root, rel, hashed=which == "files")
    return handle


async def send_file(request: web.Request, st: WebState, root: Path, rel: str,
                    hashed: bool) -> web.StreamResponse:
    c = st.counters
    try:
        # On the loop, like nginx: a few dentry-cache lookups cost less than a thread hop.
        path, info = resolve_stat(root, rel)
    except Refused:
        c["path_refused"] += 1
        return _text(403, "forbidden: path leaves the served folder")
    except (FileNotFoundError, NotADirectoryError):
        return _text(404, f"not found: {rel}")
    except OSError as e:
        return _text(403 if isinstance(e, PermissionError) else 404, f"cannot open: {rel}")

    headers: dict[str, str] = {}
    if hashed:
        if "sha256" in request.query:
            hexd = await st.hasher.digest(rel)
            if hexd is None:
                return _text(404, f"not found: {rel}")
            # sha256sum format, so `curl URL?sha256 | sha256sum -c` checks a download.
            return _text(200, f"{hexd}  {os.path.basename(rel)}", digest_headers(hexd))
        hexd = st.hasher.lookup(rel, info)
        if hexd is not None:
            headers.update(digest_headers(hexd))

    large = (request.method == "GET" and info.st_size >= st.large
             and not not_modified(request, info))
    if large:
        queued = st.admission.waiting > 0 or st.admission.active >= st.admission.limit
        if not await st.admission.acquire():
            c["refused_503"] += 1
            return _text(503, f"busy: {st.admission.limit} large transfers in progress, "
                              f"retry in {st.retry_after} s (resume with Range)",
                         {"Retry-After": str(st.retry_after)})
        if queued:
            c["queued"] += 1
        if request.transport is None or request.transport.is_closing():
            st.admission.release()  # gave up while waiting in line
            c["aborted"] += 1
            return _text(503, "client went away")
    resp = PlainFileResponse(path, info, headers=headers)
    resp.stall_timeout = st.stall_timeout
    resp.content_type = _content_type(path.name)
    if large:
        c["large_transfers"] += 1
    try:
        # Send inside the handler so the admission slot covers the whole transfer.
        await resp.prepare(request)
        await resp.write_eof()
        if request.method == "GET" and resp.status in (200, 206):
            c["bytes_sent"] += resp.content_length or 0
    except ConnectionResetError as e:
        # The client went away or stalled; it resumes with Range.  Not an error.
        c["stalled" if "stalled" in str(e) else "aborted"] += 1
    except asyncio.CancelledError:
        c["aborted"] += 1
        raise
    finally:
        if large:
            st.admission.release()
    return resp


def _content_type(name: str) -> str:
    if name.endswith((".ipxe", ".txt", ".log", ".cfg", ".sh")):
        return "text/plain"
    if name.endswith(".rpm"):
        return "application/x-rpm"
    if name.endswith((".tar.gz", ".tgz")):
        return "application/gzip"
    return "application/octet-stream"


class UploadSlots:
    """Node log uploads in progress: `total` at most, `per_node` at most for one node."""

    def __init__(self, total: int, per_node: int):
        self.total = total
        self.per_node = per_node
        self.active = 0
        self.by_node: Counter = Counter()

    def acquire(self, node_id: str) -> bool:
        if self.active >= self.total or self.by_node[node_id] >= self.per_node:
            return False
        self.active += 1
        self.by_node[node_id] += 1
        return True

    def release(self, node_id: str) -> None:
        self.active -= 1
        self.by_node[node_id] -= 1
        if self.by_node[node_id] <= 0:
            del self.by_node[node_id]


async def _closing(request: web.Request, status: int, msg: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    """Answer, then close the connection: the rest of the body is never read (aiohttp
    would otherwise linger up to 10 s reading it)."""
    resp = _text(status, msg, headers)
    resp.force_close()
    if request.transport is None or request.transport.is_closing():
        return resp  # the client is gone: nobody to answer
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionError:
        return resp
    if request.protocol is not None:
        request.protocol.force_close()  # the transport sends what it holds, then closes
    return resp


async def upload_log(request: web.Request) -> web.Response:
    st = _state(request)
    c = st.counters
    ip = norm_ip(request.remote or "")
    node = st.ctx.live.snapshot.by_ip.get(ip)
    if node is None:
        c["log_unknown_node"] += 1
        return await _closing(request, 403, f"forbidden: {ip} is not a known node address")
    limit = st.logs.max_bytes
    if request.content_length is not None and request.content_length > limit:
        c["log_too_large"] += 1
        return await _closing(request, 413, str(LogTooLarge(limit)))
    if not st.uploads.acquire(node.node_id):
        c["log_busy"] += 1
        st.bad_input(ip, "log upload refused: too many in progress", node=node.node_id,
                     remote=ip, active=st.uploads.active)
        return await _closing(request, 503, f"busy: {st.uploads.by_node[node.node_id]} uploads of "
                             f"{node.node_id} and {st.uploads.active} in all in progress "
                             f"(http.max_uploads_per_node, http.max_uploads), retry in "
                             f"{st.retry_after} s", {"Retry-After": str(st.retry_after)})
    try:
        return await _receive_log(request, st, node.node_id, ip)
    finally:
        st.uploads.release(node.node_id)


async def _receive_log(request: web.Request, st: WebState, node_id: str,
                       ip: str) -> web.Response:
    c = st.counters
    limit = st.logs.max_bytes
    deadline = asyncio.get_running_loop().time() + st.body_timeout
    tmp, f = await asyncio.to_thread(st.logs.begin, node_id)
    size = 0
    refusal: tuple[int, str] | None = None
    try:
        async for chunk in read_chunks(request, deadline, limit):
            size += len(chunk)
            await asyncio.to_thread(f.write, chunk)
    except BodyTooLarge:
        c["log_too_large"] += 1
        refusal = (413, str(LogTooLarge(limit)))
    except BodyTimeout:
        c["log_timeouts"] += 1
        st.bad_input(ip, "log upload cut off: body not received in time", node=node_id,
                     remote=ip, bytes=size, setting="http.body_timeout",
                     seconds=st.body_timeout)
        refusal = (408, f"log upload not complete within {st.body_timeout:g} s "
                        "(http.body_timeout); nothing was stored")
    except ClientGone as e:
        c["log_aborted"] += 1
        st.bad_input(ip, "log upload aborted by the node", node=node_id, remote=ip,
                     bytes=size, error=str(e)[:200])
        refusal = (400, "log upload incomplete; nothing was stored")
    except BaseException:
        f.close()
        await asyncio.to_thread(st.logs.abort, tmp)
        raise
    f.close()
    if refusal is not None:
        await asyncio.to_thread(st.logs.abort, tmp)  # before answering: nothing left behind
        return await _closing(request, *refusal)
    final = await asyncio.to_thread(st.logs.commit, node_id, tmp)
    c["logs_stored"] += 1
    return web.json_response({"node_id": node_id, "name": final.name, "size": size},
                             status=201)


async def health(request: web.Request) -> web.Response:
    st = _state(request)
    ctx = st.ctx
    snap = ctx.live.snapshot
    return web.json_response({"status": "ok", "services": st.services,
                              "nodes": len(snap.nodes), "generation": snap.generation,
                              "server": ctx.server_name})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(_state(request).ctx.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(ctx: Any, admin_token: Any, hasher: Hasher, lifecycle: Any = None,
              routes: tuple[Routes, ...] = (), services: list[str] | None = None,
              power: Any = None, consoles: Any = None) -> web.Application:
    """`hasher`: the process's file hasher; `routes`: other packages' routes (iPXE,
    TMCD JSON, USEWEB); `services`: for /health; `power`, `consoles`: the admin API's
    power and console actors (None: answered 503).  `admin_token`: an
    admintoken.TokenCheck, or a fixed token string."""
    st = WebState(ctx, hasher, lifecycle, services or ["http"], power, consoles)
    app = web.Application(middlewares=[count_middleware, api.auth_middleware],
                          client_max_size=max(1 << 20, st.logs.max_bytes + 1))
    app[STATE_KEY] = st
    with warnings.catch_warnings():  # plain string keys: other packages read them
        warnings.simplefilter("ignore")
        if isinstance(admin_token, str):
            app["admin_token"] = admin_token
        else:
            app["admin_token_check"] = admin_token
            app["admin_token"] = admin_token.token
    ctx.metrics.gauge("http_active_large_transfers", lambda: st.admission.active)
    ctx.metrics.gauge("http_max_large_transfers", lambda: st.admission.limit)
    ctx.metrics.gauge("http_queued_large_transfers", lambda: st.admission.waiting)
    ctx.metrics.count("http", "sendfile_calls", lambda: SENDFILE_STATS["sendfile_calls"])
    ctx.metrics.count("http", "sha256_computed", lambda: st.hasher.computed)
    app.router.add_get("/files/{path:.+}", _file_handler("files"))  # GET and HEAD
    app.router.add_get("/boot/{path:.+}", _file_handler("boot"))
    app.router.add_route("PUT", "/logs", upload_log)
    app.router.add_route("POST", "/logs", upload_log)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    api.add_routes(app)
    for add in routes:
        add(app)
    return app
