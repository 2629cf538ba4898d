"""The tmcc caching proxy: one process on a host serves its vnodes from one cache.

Vnodes (containers) talk TMCD to a local unix socket.  A request naming
`VNODEID=x` (or any request on a socket pinned to one vnode) is answered
from `<cachedir>/vnodes/x/<command>`; the first miss fetches that vnode's
fullconfig from the server once with `PROXYFOR=x`.  Commands with arguments
and commands outside fullconfig (status, state, isalive, ...) are forwarded
to the server with `PROXYFOR=x`.  The server only honours PROXYFOR from the
vnode's own physical host, so the proxy cannot widen what a host may see.

Give each container its own socket with `pinned_vnode` when containers
must not be able to ask for one another's configuration.
"""

from __future__ import annotations

import contextlib
import os
import socketserver
import threading
from dataclasses import replace
from pathlib import Path

from .client import TmccClient, TmccError
from .protocol import CACHEABLE, Malformed, parse_request

MAX_LINE = 4096


class TmccProxy:
    def __init__(self, client: TmccClient, socket_path: str, pinned_vnode: str | None = None):
        self.base = replace(client, vnode=None, proxy_socket=None)
        self.socket_path = socket_path
        self.pinned = pinned_vnode
        self.root = Path(client.cachedir or ".")
        self._locks: dict[str | None, threading.Lock] = {}
        self._guard = threading.Lock()
        self.fetches = 0  # fullconfig fetches from the server
        self.forwarded = 0
        self._server: socketserver.ThreadingUnixStreamServer | None = None

    def client_for(self, vnode: str | None) -> TmccClient:
        if vnode is None:
            return self.base
        return replace(self.base, proxyfor=vnode,
                       cachedir=str(self.root / "vnodes" / vnode))

    def _lock(self, vnode: str | None) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(vnode, threading.Lock())

    def answer(self, data: bytes) -> bytes:
        try:
            req = parse_request(data, MAX_LINE)
        except Malformed:
            return b""
        vnode = req.target_vnode or self.pinned
        if self.pinned and vnode != self.pinned:
            return b""  # a pinned socket serves its own vnode only
        c = self.client_for(vnode)
        if req.command in CACHEABLE and not req.args:
            hit = c.cached(req.command)
            if hit is None:
                with self._lock(vnode):  # one fetch per vnode even under a burst
                    hit = c.cached(req.command)
                    if hit is None:
                        self.fetches += 1
                        c.fetch_fullconfig()
                        hit = c.cached(req.command)
            if hit is not None:
                return hit
        self.forwarded += 1
        return c.request(req.command, req.args)

    def refresh(self, vnode: str | None) -> None:
        with self._lock(vnode):
            self.fetches += 1
            self.client_for(vnode).fetch_fullconfig()

    # -- the unix socket ---------------------------------------------------------

    def start(self) -> None:
        """Listen in a background thread (tests, embedding)."""
        self._bind()
        assert self._server is not None
        threading.Thread(target=self._server.serve_forever, name="tmcc-proxy",
                         daemon=True).start()

    def serve_forever(self) -> None:
        self._bind()
        assert self._server is not None
        try:
            self._server.serve_forever()
        finally:
            self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)

    def _bind(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 10.0

            def handle(self) -> None:
                data = b""
                while b"\n" not in data and len(data) <= MAX_LINE:
                    chunk = self.request.recv(MAX_LINE)
                    if not chunk:
                        break
                    data += chunk
                try:
                    reply = proxy.answer(data)
                except TmccError:
                    reply = b""
                if reply:
                    self.request.sendall(reply)

        srv = socketserver.ThreadingUnixStreamServer(self.socket_path, Handler)
        srv.daemon_threads = True
        self._server = srv
