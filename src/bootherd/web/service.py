"""The HTTP service: files, iPXE scripts, node logs, the admin API, metrics."""

from __future__ import annotations

import logging
import ssl
from typing import Any

from aiohttp import web

from .. import admintoken
from ..config import ConfigError
from ..logs import event
from ..policy import url_host
from .app import STATE_KEY, Routes, WebState, build_app
from .files import Hasher
from .guard import AccessLog, ServerLog, access_log, cap_connections

log = logging.getLogger("bootherd.web")

# Kernel accept queue for connection bursts (capped by net.core.somaxconn).
BACKLOG = 4096


def runner_options(cfg: Any, st: WebState) -> dict[str, Any]:
    """How aiohttp's connection handlers treat clients (see web/guard.py)."""
    opts: dict[str, Any] = {
        # Runs from the connection's start and from each response's end: a request
        # head not complete by then (an idle or half-sent request) closes it.
        "keepalive_timeout": float(cfg.http.header_timeout),
        "logger": ServerLog(st.counters, cfg.log.bad_input_interval),
        # A request per line only when asked for (log.requests): metrics count them anyway.
        "access_log": None,
    }
    if "http" in cfg.log.requests:
        opts.update(access_log=access_log, access_log_class=AccessLog)
    return opts


def read_admin_token(config: Any) -> str:
    """What a CLI on the same host uses to call the API (FileNotFoundError: none yet)."""
    return admintoken.read(config)


class HttpService:
    name = "http"

    def __init__(self, ctx: Any, hasher: Hasher, lifecycle: Any = None,
                 routes: tuple[Routes, ...] = (), services: list[str] | None = None,
                 power: Any = None, consoles: Any = None):
        self.ctx = ctx
        self.hasher = hasher
        self.lifecycle = lifecycle
        self.routes = routes
        self.services = services
        self.power = power
        self.consoles = consoles
        self.app: web.Application | None = None
        self.runner: web.AppRunner | None = None
        self.port: int = 0
        self.tls_port: int = 0

    @property
    def state(self) -> WebState:
        assert self.app is not None
        return self.app[STATE_KEY]  # type: ignore[return-value]

    async def start(self) -> None:
        cfg = self.ctx.config
        addr, port = cfg.http.address, int(cfg.http.port)
        tokens = admintoken.TokenCheck(cfg)
        log.info("admin API token in %s", admintoken.where(cfg))
        self.app = build_app(self.ctx, tokens, self.hasher, self.lifecycle,
                             self.routes, self.services, self.power, self.consoles)
        st = self.state
        self.runner = web.AppRunner(self.app, handle_signals=False, **runner_options(cfg, st))
        await self.runner.setup()
        assert self.runner.server is not None
        cap_connections(self.runner.server, int(cfg.http.max_connections), st.counters,
                        st.bad_input)
        site = web.TCPSite(self.runner, addr, port, backlog=BACKLOG, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            self.runner = None
            raise OSError(e.errno, f"http: cannot listen on {addr}:{port}: {e.strerror}") from e
        server = getattr(site, "_server", None)
        socks = getattr(server, "sockets", None) or []
        self.port = socks[0].getsockname()[1] if socks else port
        if cfg.http.tls_port:
            await self._start_https(addr, int(cfg.http.tls_port))
        st.hasher.warm()
        event(log, logging.INFO, "http listening", address=f"{addr}:{self.port}",
              root=str(st.files_root))

    async def _start_https(self, addr: str, port: int) -> None:
        """The same application over HTTPS (Emulab's install-tarfile insists on it)."""
        cfg = self.ctx.config
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(str(cfg.path(cfg.http.tls_cert)), str(cfg.path(cfg.http.tls_key)))
        except (OSError, ssl.SSLError) as e:
            await self.stop()
            raise ConfigError(f"http.tls_cert / http.tls_key: cannot load: {e}") from None
        assert self.runner is not None
        site = web.TCPSite(self.runner, addr, port, backlog=BACKLOG, reuse_address=True,
                           ssl_context=ctx)
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            raise OSError(e.errno, f"http: cannot listen on {addr}:{port} (https): "
                                   f"{e.strerror}") from e
        server = getattr(site, "_server", None)
        socks = getattr(server, "sockets", None) or []
        self.tls_port = socks[0].getsockname()[1] if socks else port
        event(log, logging.INFO, "https listening", address=f"{addr}:{self.tls_port}")

    def file_url(self, rel: str, server: str = "") -> str:
        """The URL of a file under http.root as a node at `server` (the address it
        reaches this server at) fetches it."""
        cfg = self.ctx.config
        host = server or cfg.server.public_address or cfg.http.address
        return f"http://{url_host(host)}:{self.port}/files/{rel.lstrip('/')}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
