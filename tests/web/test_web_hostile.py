"""Hostile HTTP clients cost bounded time, descriptors and log lines (real sockets).

Each test plays a client a node or an attacker could be: idle or half-sent requests,
a log upload that drips a byte every two seconds, uploads that pile up, an upload
cut off mid-body, malformed requests, too many connections, and admin API bodies that
Python's JSON parser cannot take (millions of digits, arrays nested 100,000 deep).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path

import pytest
from web_helpers import Server, start_server, stop_server


@pytest.fixture(name="hserver")
async def hserver_fixture(tmp_path: Path):  # noqa: ANN201
    s = await start_server(tmp_path, header_timeout=1.0, body_timeout=3.0,
                           max_uploads_per_node=2, max_uploads=3, max_connections=40)
    try:
        yield s
    finally:
        await stop_server(s)


async def _connect(s: Server, src: str = "127.0.0.1") -> tuple[asyncio.StreamReader,
                                                                 asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", s.svc.port, local_addr=(src, 0))


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent until it closed; fails if it keeps the socket open."""
    data = b""
    async with asyncio.timeout(seconds):
        while chunk := await reader.read(4096):
            data += chunk
    return data


def _tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


async def test_idle_and_half_sent_requests_are_closed(hserver: Server) -> None:
    idle_r, idle_w = await _connect(hserver)
    half_r, half_w = await _connect(hserver)
    half_w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # the head never ends
    await half_w.drain()
    # Closed after http.header_timeout (1 s here), long before the 20 s we would wait.
    assert await _closed_within(idle_r, 20) == b""
    assert await _closed_within(half_r, 20) == b""
    idle_w.close()
    half_w.close()
    # A connection that completes its requests is served, and then idles out the same way.
    r, w = await _connect(hserver)
    w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await w.drain()
    data = await _closed_within(r, 20)
    assert data.startswith(b"HTTP/1.1 200") and b'"status": "ok"' in data
    w.close()


async def test_log_upload_dripping_a_byte_every_two_seconds_is_cut_off(
        hserver: Server, caplog: pytest.LogCaptureFixture) -> None:
    ip = hserver.node_ip(0)
    r, w = await _connect(hserver, ip)
    w.write(b"PUT /logs HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    await w.drain()
    answer = b""
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        for _ in range(30):  # 60 s of dripping if nobody stops it
            try:
                w.write(b"x")
                await w.drain()
            except ConnectionError:
                break
            try:
                async with asyncio.timeout(2):
                    chunk = await r.read(4096)
            except TimeoutError:
                continue
            answer += chunk
            if not chunk:
                break
    assert time.monotonic() - started < 30
    assert answer.startswith(b"HTTP/1.1 408") and b"http.body_timeout" in answer
    w.close()
    nid = hserver.ctx.live.snapshot.by_ip[ip].node_id
    d = hserver.tmp / "nodelogs" / nid
    assert not d.exists() or not list(d.iterdir())  # no log, no temporary file left
    assert hserver.ctx.metrics.protocol("http")["log_timeouts"] == 1
    assert not _tracebacks(caplog)


async def test_uploads_in_progress_are_capped_per_node_and_overall(hserver: Server) -> None:
    async def start_upload(ip: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await _connect(hserver, ip)
        w.write(b"PUT /logs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nstarted")
        await w.drain()
        return r, w

    a, b, c = hserver.node_ip(0), hserver.node_ip(1), hserver.node_ip(2)
    held = [await start_upload(a), await start_upload(a)]
    await asyncio.sleep(0.3)  # both admitted and waiting for the rest of their bodies
    r, w = await start_upload(a)  # a third from the same node: over max_uploads_per_node
    third = await _closed_within(r, 10)
    assert third.startswith(b"HTTP/1.1 503") and b"Retry-After" in third
    assert b"http.max_uploads_per_node" in third
    w.close()
    held.append(await start_upload(b))  # another node still gets a slot ...
    await asyncio.sleep(0.3)
    r, w = await start_upload(c)  # ... until max_uploads (3) are in progress
    assert (await _closed_within(r, 10)).startswith(b"HTTP/1.1 503")
    w.close()
    for _r, hw in held:
        hw.close()
    await asyncio.sleep(0.5)
    # The slots are free again once those uploads are gone.
    r, w = await _connect(hserver, c)
    w.write(b"PUT /logs HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
    await w.drain()
    assert (await _closed_within(r, 10)).startswith(b"HTTP/1.1 201")
    w.close()
    assert hserver.ctx.metrics.protocol("http")["log_busy"] == 2


async def test_aborted_upload_writes_one_warning_and_no_traceback(
        hserver: Server, caplog: pytest.LogCaptureFixture) -> None:
    ip = hserver.node_ip(4)
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):  # the same node three times: still one line
            r, w = await _connect(hserver, ip)
            w.write(b"PUT /logs HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n"
                    + b"partial log\n" * 10)
            await w.drain()
            await asyncio.sleep(0.2)
            w.transport.abort()  # the node reboots mid-upload
            await asyncio.sleep(0.3)
    assert hserver.ctx.metrics.protocol("http")["log_aborted"] == 3
    assert not _tracebacks(caplog)
    warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert len(warnings) == 1, [rec.getMessage() for rec in warnings]
    assert warnings[0].getMessage() == "log upload aborted by the node"
    nid = hserver.ctx.live.snapshot.by_ip[ip].node_id
    d = hserver.tmp / "nodelogs" / nid
    assert not d.exists() or not list(d.iterdir())


async def test_malformed_requests_are_counted_answered_and_logged_once(
        hserver: Server, caplog: pytest.LogCaptureFixture) -> None:
    bad = [b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
           b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n",
           b"GET /health HTTP/9.x\r\n\r\n",
           b"GET /health HTTP/1.1\r\nBad Header Line\r\n\r\n"]
    with caplog.at_level(logging.DEBUG):
        for payload in bad:
            r, w = await _connect(hserver)
            w.write(payload)
            await w.drain()
            answer = await _closed_within(r, 10)
            assert answer.split(b" ")[1].startswith(b"4"), answer[:80]
            w.close()
    assert hserver.ctx.metrics.protocol("http")["bad_requests"] == len(bad)
    assert not _tracebacks(caplog)
    lines = [rec for rec in caplog.records if rec.getMessage() == "http bad request"]
    assert len(lines) == 1  # one source, one line per interval


async def test_connections_over_the_cap_are_closed(tmp_path: Path) -> None:
    s = await start_server(tmp_path, max_connections=5, header_timeout=30.0)
    try:
        held = [await _connect(s) for _ in range(5)]
        await asyncio.sleep(0.2)
        r, w = await _connect(s)
        assert await _closed_within(r, 10) == b""
        w.close()
        assert s.ctx.metrics.protocol("http")["connections_refused"] == 1
        for _r, hw in held:
            hw.close()
        await asyncio.sleep(0.3)
        r, w = await _connect(s)  # room again
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await w.drain()
        assert (await _closed_within(r, 10)).startswith(b"HTTP/1.1 200")
        w.close()
    finally:
        await stop_server(s)


def _api_post(s: Server, path: str, body: bytes) -> tuple[int, bytes]:
    """A plain socket client: the body goes out as one blob, the answer is read whole."""
    with socket.create_connection(("127.0.0.1", s.svc.port), timeout=30) as c:
        c.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {s.token}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                  "Connection: close\r\n\r\n".encode())
        try:
            c.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the whole body went out: the answer is still there
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


async def test_admin_api_answers_400_to_bodies_the_parser_cannot_take(
        hserver: Server, caplog: pytest.LogCaptureFixture) -> None:
    digits = b'{"pid": "p", "eid": "e", "creator": ' + b"7" * 3_000_000 + b"}"
    nested = b"[" * 100_000 + b"]" * 100_000
    with caplog.at_level(logging.WARNING):
        for body in (digits, nested, b'{"pid": '):
            status, rest = await asyncio.to_thread(_api_post, hserver, "/api/experiments", body)
            assert status == 400, rest[:200]
            assert "not valid JSON" in json.loads(rest)["error"]
        big = b'{"x": "' + b"a" * (5 * 2**20) + b'"}'  # over http.max_api_body (4 MiB)
        status, rest = await asyncio.to_thread(_api_post, hserver, "/api/experiments", big)
        assert status == 413
    assert not _tracebacks(caplog)
    assert hserver.ctx.metrics.protocol("http")["status_5xx"] == 0
