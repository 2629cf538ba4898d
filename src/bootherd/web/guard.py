"""What a hostile or broken HTTP client may cost: bounded time, descriptors and log lines.

- The request head: aiohttp's keep-alive timer runs from the moment a connection
  opens and from the end of each response, and closes a connection that has not
  completed a request by then; `http.header_timeout` sets it, so an idle or
  half-sent request holds its socket that long at most.
- Request bodies: `read_body` reads under one deadline (`http.body_timeout`) for
  the whole body and a size limit, so a client sending a byte every two seconds
  is cut off like one that sends nothing.
- Connections: at most `http.max_connections` open; one over is closed at once.
- Log lines: aiohttp logs a malformed request or a client gone mid-response with
  a traceback; `ServerLog` turns each into one counted, rate-limited warning line.
- Access log: `AccessLog`, one structured line per request, on only when
  `log.requests` names http.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..logs import RateLimited, event

log = logging.getLogger("bootherd.web")
access_log = logging.getLogger("bootherd.http.access")


class BodyTimeout(Exception):
    pass


class BodyTooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"body larger than {limit} bytes")
        self.limit = limit


class ClientGone(Exception):
    """The client closed the connection before its body was complete."""


async def read_chunks(request: web.Request, deadline: float, limit: int):  # noqa: ANN201
    """Yield the body's chunks; raise BodyTimeout past `deadline` (loop time),
    BodyTooLarge past `limit` bytes, ClientGone if the client went away."""
    size = 0
    try:
        async with asyncio.timeout_at(deadline):
            while chunk := await request.content.read(1 << 16):
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
                yield chunk
    except TimeoutError:
        raise BodyTimeout() from None
    except (ConnectionError, EOFError, asyncio.IncompleteReadError) as e:
        raise ClientGone(str(e) or type(e).__name__) from None
    except Exception as e:
        # aiohttp's payload errors (ClientPayloadError, ContentLengthError, ...) when
        # the peer hangs up in the middle; anything else is a real fault.
        if type(e).__module__.startswith("aiohttp"):
            raise ClientGone(str(e) or type(e).__name__) from None
        raise


async def read_body(request: web.Request, timeout: float, limit: int) -> bytes:
    loop = asyncio.get_running_loop()
    parts = [c async for c in read_chunks(request, loop.time() + timeout, limit)]
    return b"".join(parts)


class ServerLog:
    """The logger aiohttp's connection handler writes to: errors that a client causes
    (a malformed request, a reset while answering) become one warning line, at most one
    per source per interval, and a counter; nothing else aiohttp says is lost."""

    def __init__(self, counters: Counter, interval: float):
        self.counters = counters
        self.limited = RateLimited(log, interval)

    def _client_error(self, msg: str, args: tuple, kw: dict) -> None:
        exc = kw.get("exc_info")
        exc = exc if isinstance(exc, BaseException) else None
        remote = str(args[0]) if args else ""
        self.counters["bad_requests"] += 1
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else msg % args
        self.limited(remote or "?", "http bad request", remote=remote,
                     error=reason.splitlines()[0][:200] if reason else "")

    def exception(self, msg: str, *args: Any, **kw: Any) -> None:
        self._client_error(msg, args, kw)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self._client_error(msg, args, kw)

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self._client_error(msg, args, kw)

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        log.debug(msg, *args)

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        # Non-HTTP bytes on the port (aiohttp logs those at debug): counted as well.
        if msg.startswith("Error handling request"):
            self.counters["bad_requests"] += 1
        log.debug(msg, *args)

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - the logging API's name
        return log.isEnabledFor(level)


class AccessLog(AbstractAccessLogger):
    """One line per request with its fields (http in log.requests)."""

    @property
    def enabled(self) -> bool:
        return access_log.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        event(self.logger, logging.INFO, "http request", remote=request.remote or "",
              method=request.method, path=request.path_qs[:512], status=response.status,
              bytes=response.body_length, seconds=round(time, 6),
              agent=request.headers.get("User-Agent", "")[:128])


def cap_connections(server: web.Server, limit: int, counters: Counter,
                    limited: RateLimited) -> None:
    """Close any connection that would make more than `limit` open at once."""
    made = server.connection_made

    def connection_made(handler: Any, transport: asyncio.Transport) -> None:
        made(handler, transport)
        if len(server.connections) > limit:
            counters["connections_refused"] += 1
            peer = transport.get_extra_info("peername") or ("?",)
            limited("connections", "http connection refused: too many open",
                    remote=peer[0], limit=limit, setting="http.max_connections")
            transport.abort()

    server.connection_made = connection_made  # type: ignore[method-assign]
