"""GET /config (by source address) and the admin GET /api/nodes/{id}/config."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from bootherd.procs import free_port
from bootherd.tmcd.http import add_routes

pytestmark = pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")


async def _app(env):  # noqa: ANN001, ANN202
    app = web.Application()
    app["admin_token"] = "s3cret-token"
    add_routes(app, env.live, env.ctx.metrics, env.service.views)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, port


async def test_own_config_by_source_address(env) -> None:  # noqa: ANN001
    runner, port = await _app(env)
    try:
        n = next(n for n in env.allocated())
        conn = aiohttp.TCPConnector(local_addr=(n.control_ip, 0))
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.get(f"http://127.0.0.1:{port}/config") as r:
                assert r.status == 200
                doc = await r.json()
        assert doc["node_id"] == n.node_id
        assert doc["status"].startswith("ALLOCATED=")
        assert doc["sections"]["accounts"][0].startswith("ADDGROUP")  # TCP: secrets included
        assert "hostnames" in doc["sections"]
        # An address that is no node's gets 404, never someone's data.
        conn = aiohttp.TCPConnector(local_addr=("127.0.0.6", 0))
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.get(f"http://127.0.0.1:{port}/config") as r:
                assert r.status == 404
    finally:
        await runner.cleanup()


async def test_admin_config_needs_token(env) -> None:  # noqa: ANN001
    runner, port = await _app(env)
    n = env.allocated()[0]
    url = f"http://127.0.0.1:{port}/api/nodes/{n.node_id}/config"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url) as r:
                assert r.status == 401
            async with s.get(url, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
            async with s.get(url, headers={"Authorization": "Bearer s3cret-token"}) as r:
                assert r.status == 200
                assert (await r.json())["node_id"] == n.node_id
            async with s.get(f"http://127.0.0.1:{port}/api/nodes/nope/config",
                             headers={"Authorization": "Bearer s3cret-token"}) as r:
                assert r.status == 404
    finally:
        await runner.cleanup()
