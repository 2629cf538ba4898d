"""N concurrent HTTP downloads of one file (bench/http's load generator, any host)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from functools import partial
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_http_run",
                                               Path(__file__).parents[1] / "http" / "run.py")
_http = importlib.util.module_from_spec(_spec)
sys.modules["bench_http_run"] = _http  # dataclasses look their module up there
_spec.loader.exec_module(_http)  # type: ignore[union-attr]


async def download(host: str, port: int, path: str, size: int, load) -> None:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    have = 0
    while have < size:
        rng = f"Range: bytes={have}-\r\n" if have else ""
        req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{rng}Connection: close\r\n\r\n".encode()
        done: asyncio.Future = loop.create_future()
        try:
            await loop.create_connection(partial(_http._Get, req, done), host, port)
        except OSError:
            load.errors += 1
            await asyncio.sleep(0.5)
            continue
        g = await done
        if g.status == 503:
            load.n503 += 1
            await asyncio.sleep(g.retry_after)
            continue
        if g.status in (200, 206):
            got = max(0, min(g.body, g.length if g.length >= 0 else g.body))
            have = (0 if g.status == 200 else have) + got
            continue
        load.errors += 1
        await asyncio.sleep(1.0)
    load.done += 1


async def storm(host: str, port: int, path: str, size: int, n: int, deadline: float) -> dict:
    load = _http.Load()
    t0 = time.monotonic()
    tasks = [asyncio.ensure_future(download(host, port, path, size, load)) for _ in range(n)]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for t in pending:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"done": load.done, "seconds": time.monotonic() - t0, "n503": load.n503,
            "errors": load.errors}
