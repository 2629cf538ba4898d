"""A storm of large downloads becomes a queue: 503 + Retry-After, resume, all finish."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket

import aiohttp
from web_helpers import (
    LARGE,
    Server,
    make_file,
    server_fixture,  # noqa: F401 - fixtures
)


def small_window(addr_info: tuple) -> socket.socket:
    """A client socket with a fixed 64 KiB receive buffer: loopback autotunes it up to
    tcp_rmem's maximum (32 MiB here), which would swallow a whole test file at once and
    free its slot before the next request arrives.  A slow reader behind a small window
    holds its slot as a real node on a real link does."""
    family, type_, proto, _, _ = addr_info
    s = socket.socket(family, type_, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    return s


# The server's send buffer on loopback starts at a few MB (its MSS is 64 KiB): a file
# must be bigger than that, or the whole of it leaves in one sendfile() and its slot is
# free again before the next request is read.
BIGGER_THAN_SOCKET_BUFFERS = 8 * 2**20


def slow_clients() -> aiohttp.TCPConnector:
    return aiohttp.TCPConnector(limit=0, socket_factory=small_window)


async def patient_download(session: aiohttp.ClientSession, url: str, stats: dict) -> bytes:
    """What a well-behaved node does: honour Retry-After, resume with Range."""
    got = bytearray()
    while True:
        headers = {"Range": f"bytes={len(got)}-"} if got else {}
        try:
            async with session.get(url, headers=headers) as r:
                if r.status == 503:
                    stats["503"] += 1
                    assert r.headers["Retry-After"] == "1"
                    await asyncio.sleep(float(r.headers["Retry-After"]))
                    continue
                assert r.status == (206 if got else 200), r.status
                while chunk := await r.content.read(32768):
                    got += chunk
                    await asyncio.sleep(0.002)  # a slow reader keeps its slot busy
                stats["done"] += 1
                return bytes(got)
        except aiohttp.ClientPayloadError:
            stats["resumed"] += 1  # connection lost mid-transfer: resume


async def test_storm_of_large_downloads_is_queued(server: Server) -> None:
    data = make_file(server.root / "images" / "img.ndz", BIGGER_THAN_SOCKET_BUFFERS, seed=5)
    small = make_file(server.root / "scripts" / "boot.ipxe", 300)
    want = hashlib.sha256(data).hexdigest()
    stats = {"503": 0, "done": 0, "resumed": 0}
    st = server.svc.state
    st.admission.max_queued = 4  # a short line, so most of the storm is told to retry
    st.admission.queue_timeout = 0.2
    peak = 0
    small_ok = 0
    stop = asyncio.Event()

    async def small_requests(session: aiohttp.ClientSession) -> None:
        nonlocal peak, small_ok
        while not stop.is_set():
            peak = max(peak, st.admission.active)
            async with session.get(f"{server.url}/files/scripts/boot.ipxe") as r:
                assert r.status == 200 and await r.read() == small
            async with session.get(f"{server.url}/health") as r:
                assert r.status == 200
            small_ok += 1
            await asyncio.sleep(0.02)

    async with aiohttp.ClientSession(connector=slow_clients()) as big, aiohttp.ClientSession() as sm:
        checker = asyncio.create_task(small_requests(sm))
        url = f"{server.url}/files/images/img.ndz"
        results = await asyncio.wait_for(
            asyncio.gather(*(patient_download(big, url, stats) for _ in range(20))), 120)
        stop.set()
        await checker
    assert all(hashlib.sha256(r).hexdigest() == want for r in results)
    assert stats["done"] == 20
    assert stats["503"] > 0  # some were told to come back
    assert peak <= 4 and st.admission.active == 0
    assert small_ok > 0
    c = server.ctx.metrics.protocol("http")
    assert c["refused_503"] == stats["503"]
    assert c["large_transfers"] >= 20
    async with aiohttp.ClientSession() as s, s.get(f"{server.url}/metrics") as r:
        text = await r.text()
    assert 'bootherd_events_total{event="refused_503",protocol="http"}' in text
    assert "bootherd_http_active_large_transfers 0.0" in text


async def test_queue_hands_slots_over_without_503(server: Server) -> None:
    """With a line long enough, a storm is served in order and nobody is refused."""
    data = make_file(server.root / "images" / "q.ndz", BIGGER_THAN_SOCKET_BUFFERS, seed=6)
    st = server.svc.state
    st.admission.queue_timeout = 30  # generous: this test is about order, not time
    stats = {"503": 0, "done": 0, "resumed": 0}
    url = f"{server.url}/files/images/q.ndz"
    async with aiohttp.ClientSession(connector=slow_clients()) as s:
        results = await asyncio.wait_for(
            asyncio.gather(*(patient_download(s, url, stats) for _ in range(12))), 120)
    assert all(r == data for r in results)
    assert stats["503"] == 0 and st.admission.queued > 0 and st.admission.active == 0
    assert server.ctx.metrics.protocol("http")["queued"] > 0


async def test_admission_queue_unit() -> None:
    from bootherd.web.files import Admission

    a = Admission(1, max_queued=1, queue_timeout=5)
    assert await a.acquire()
    waiter = asyncio.create_task(a.acquire())  # waits in line
    await asyncio.sleep(0)
    assert a.waiting == 1
    assert not await a.acquire()  # the line is full: refuse at once
    a.release()  # the slot goes to the waiter, not back to the pool
    assert await waiter and a.active == 1 and a.waiting == 0
    b = Admission(1, max_queued=5, queue_timeout=0.05)
    assert await b.acquire()
    assert not await b.acquire()  # waited its time, then refused
    assert b.waiting == 0 and b.refused == 1
    # a cancelled waiter does not leak the slot handed to it
    c = Admission(1, max_queued=5, queue_timeout=5)
    assert await c.acquire()
    t = asyncio.create_task(c.acquire())
    await asyncio.sleep(0)
    c.release()
    t.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await t
    assert c.active == 0


async def test_head_and_conditional_do_not_take_slots(server: Server) -> None:
    make_file(server.root / "img2", 2 * LARGE)
    st = server.svc.state
    st.admission.queue_timeout = 0  # no line: straight to 503
    for _ in range(st.admission.limit):
        assert st.admission.try_acquire()  # every slot busy
    try:
        async with aiohttp.ClientSession() as s:
            url = f"{server.url}/files/img2"
            async with s.get(url) as r:
                assert r.status == 503 and r.headers["Retry-After"] == "1"
                assert "retry" in (await r.text())
            async with s.head(url) as r:
                assert r.status == 200
                etag = r.headers["ETag"]
            async with s.get(url, headers={"If-None-Match": etag}) as r:
                assert r.status == 304
    finally:
        for _ in range(st.admission.limit):
            st.admission.release()


async def test_stalled_client_loses_its_slot(server: Server) -> None:
    import socket

    make_file(server.root / "huge", 12 * 2**20)
    st = server.svc.state
    st.stall_timeout = 0.3
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that never reads
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(s, ("127.0.0.1", server.svc.port))
    await loop.sock_sendall(s, b"GET /files/huge HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        for _ in range(100):
            if st.admission.active == 1:
                break
            await asyncio.sleep(0.02)
        assert st.admission.active == 1
        for _ in range(200):
            if st.admission.active == 0:
                break
            await asyncio.sleep(0.02)
        assert st.admission.active == 0
        assert server.ctx.metrics.protocol("http")["stalled"] == 1
    finally:
        s.close()
