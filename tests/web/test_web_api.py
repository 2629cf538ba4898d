"""Admin API: token authentication, inventory operations, orders, health, metrics."""

from __future__ import annotations

import asyncio
import socket
import stat
from pathlib import Path

import aiohttp
import pytest
from web_helpers import (
    Server,
    make_file,
    server_fixture,  # noqa: F401 - fixtures
    start_server,
    stop_server,
)

from bootherd.boottype import BootType
from bootherd.service import StartupError


def auth(s: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {s.token}"}


async def test_token_required(server: Server) -> None:
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Basic {server.token}"},
                        {"Authorization": "Bearer " + server.token + "x"},
                        {"Authorization": "Bearer \u00e9t\u00e9"}):
            async with s.get(f"{server.url}/api/nodes", headers=headers) as r:
                assert r.status == 401
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
                assert "token" in (await r.json())["error"]
        async with s.post(f"{server.url}/api/nodes/pc1/free") as r:
            assert r.status == 401
        async with s.get(f"{server.url}/api/nodes", headers=auth(server)) as r:
            assert r.status == 200
            nodes = await r.json()
        assert len(nodes) == 20 and nodes[0]["node_id"]
        # the spec itself is public
        async with s.get(f"{server.url}/api/openapi.yaml") as r:
            assert r.status == 200
            spec = await r.text()
        assert spec.startswith("openapi: 3")
    assert server.ctx.metrics.protocol("http")["api_unauthorized"] >= 5


def test_openapi_covers_routes() -> None:
    import yaml

    from bootherd.web.api import OPENAPI

    spec = yaml.safe_load(OPENAPI.read_text())
    assert spec["openapi"].startswith("3.")
    paths = set(spec["paths"])
    for p in ("/api/nodes", "/api/nodes/{id}", "/api/nodes/{id}/events", "/api/nodes/{id}/logs",
              "/api/nodes/{id}/wake", "/api/nodes/{id}/reboot", "/api/nodes/{id}/free",
              "/api/experiments", "/api/experiments/{pid}/{eid}/allocate", "/api/states",
              "/api/power", "/api/nodes/{id}/power", "/api/nodes/{id}/console", "/api/consoles",
              "/api/reload", "/api/images", "/api/images/{name}", "/api/imaging/sessions"):
        assert p in paths, p


async def test_generated_token_file_is_private(server: Server) -> None:
    f = server.tmp / "admin-token"
    assert f.read_text().strip() == server.token
    assert stat.S_IMODE(f.stat().st_mode) == 0o600


async def test_configured_token_is_used(tmp_path: Path) -> None:
    s = await start_server(tmp_path, admin_token="s3cret-token")
    try:
        assert s.token == "s3cret-token" and not (tmp_path / "admin-token").exists()
        async with aiohttp.ClientSession() as c:
            async with c.get(f"{s.url}/api/states",
                             headers={"Authorization": "Bearer s3cret-token"}) as r:
                assert r.status == 200
    finally:
        await stop_server(s)


async def test_node_operations(server: Server) -> None:
    h = auth(server)
    snap = server.ctx.live.snapshot
    nid = sorted(snap.nodes)[0]
    async with aiohttp.ClientSession(headers=h) as s:
        async with s.get(f"{server.url}/api/nodes/{nid}") as r:
            assert r.status == 200
            node = await r.json()
        assert node["node_id"] == nid and node["interfaces"]
        async with s.get(f"{server.url}/api/nodes/nosuch") as r:
            assert r.status == 404 and "nosuch" in (await r.json())["error"]
        async with s.patch(f"{server.url}/api/nodes/{nid}",
                           json={"boot_cmdline": "console=ttyS0"}) as r:
            assert r.status == 200
            assert (await r.json())["boot_cmdline"] == "console=ttyS0"
        async with s.patch(f"{server.url}/api/nodes/{nid}", json={"node_id": "x"}) as r:
            assert r.status == 400 and "cannot set" in (await r.json())["error"]
        async with s.patch(f"{server.url}/api/nodes/{nid}", data=b"{not json") as r:
            assert r.status == 400
        async with s.patch(f"{server.url}/api/nodes/{nid}", json=[1]) as r:
            assert r.status == 400
        server.ctx.live.record_state(nid, "PXEWAIT", "test")
        await asyncio.to_thread(server.ctx.live.writer.flush)
        async with s.get(f"{server.url}/api/nodes/{nid}/events") as r:
            assert r.status == 200
            assert [e["state"] for e in await r.json()][-1] == "PXEWAIT"
        async with s.get(f"{server.url}/api/nodes/{nid}/events?limit=x") as r:
            assert r.status == 400
        async with s.get(f"{server.url}/api/nodes/nosuch/events") as r:
            assert r.status == 404
        async with s.get(f"{server.url}/api/states") as r:
            body = await r.json()
        assert body["nodes"] == 20 and body["states"]["PXEWAIT"] == 1
        assert sum(body["states"].values()) == 20


async def test_experiments_allocate_free(server: Server) -> None:
    snap = server.ctx.live.snapshot
    user = sorted(snap.users)[0]
    free_node = sorted(n for n, node in snap.nodes.items() if node.allocation is None)[0]
    used = sorted(n for n, node in snap.nodes.items() if node.allocation is not None)[0]
    async with aiohttp.ClientSession(headers=auth(server)) as s:
        async with s.post(f"{server.url}/api/experiments",
                          json={"pid": "proj", "eid": "exp1", "creator": user}) as r:
            assert r.status == 201, await r.text()
        async with s.post(f"{server.url}/api/experiments",
                          json={"pid": "proj", "eid": "exp1", "creator": user}) as r:
            assert r.status == 409
        async with s.post(f"{server.url}/api/experiments", json={"pid": "proj"}) as r:
            assert r.status == 400 and "eid" in (await r.json())["error"]
        async with s.post(f"{server.url}/api/experiments",
                          json={"pid": "p", "eid": "e", "creator": "nobody-here"}) as r:
            assert r.status == 404
        async with s.get(f"{server.url}/api/experiments") as r:
            assert {"pid": "proj", "eid": "exp1"}.items() <= next(
                e for e in await r.json() if e["eid"] == "exp1").items()
        url = f"{server.url}/api/experiments/proj/exp1/allocate"
        async with s.post(url, json={"node_id": free_node, "vname": "n0"}) as r:
            assert r.status == 201, await r.text()
        async with s.post(url, json={"node_id": used, "vname": "n1"}) as r:
            assert r.status == 409 and "allocated" in (await r.json())["error"]
        async with s.post(f"{server.url}/api/experiments/proj/nope/allocate",
                          json={"node_id": used, "vname": "n1"}) as r:
            assert r.status == 404
        # the running server sees the allocation without a restart
        for _ in range(100):
            node = server.ctx.live.snapshot.nodes[free_node]
            if node.allocation is not None:
                break
            await asyncio.sleep(0.05)
        assert node.allocation is not None and node.allocation.vname == "n0"
        async with s.post(f"{server.url}/api/nodes/{free_node}/free") as r:
            assert r.status == 200
        async with s.post(f"{server.url}/api/nodes/{free_node}/free") as r:
            assert r.status == 404


class RecordingOrders:
    """An order sender that records instead of sending (the bootinfo transport's role)."""

    running = True

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    def send(self, ip: str, kind: BootType) -> str:
        self.sent.append((ip, kind))
        return f"sent {kind.name}"


async def test_wake_and_reboot_go_through_the_coordinator(server: Server) -> None:
    nid = sorted(server.ctx.live.snapshot.nodes)[0]
    ip = server.ctx.live.snapshot.nodes[nid].control_ip
    lc = server.wiring.lifecycle
    async with aiohttp.ClientSession(headers=auth(server)) as s:
        async with s.post(f"{server.url}/api/nodes/{nid}/wake") as r:
            assert r.status == 503 and "bootinfo" in (await r.json())["error"]
        fake = lc.orders = RecordingOrders()
        async with s.post(f"{server.url}/api/nodes/{nid}/wake") as r:
            assert r.status == 202 and (await r.json())["result"] == "sent AUTO"
        async with s.post(f"{server.url}/api/nodes/{nid}/wake", json={"order": "REBOOT"}) as r:
            assert r.status == 202 and (await r.json())["order"] == "REBOOT"
        # A reboot is the ladder's (tests/power/test_power_reboot.py): not waiting in its
        # loader, no OS up, no BMC: refused with the reason, no order sent.
        async with s.post(f"{server.url}/api/nodes/{nid}/reboot") as r:
            assert r.status == 409 and "no BMC" in (await r.json())["error"]
        async with s.post(f"{server.url}/api/nodes/{nid}/wake", json={"order": "restart"}) as r:
            assert r.status == 202
        async with s.post(f"{server.url}/api/nodes/{nid}/wake", json={"order": "PART"}) as r:
            assert r.status == 409 and "AUTO, REBOOT or RESTART" in (await r.json())["error"]
        async with s.post(f"{server.url}/api/nodes/{nid}/wake", json={"order": 5}) as r:
            assert r.status == 400
        async with s.post(f"{server.url}/api/nodes/nosuch/wake") as r:
            assert r.status == 404
    assert fake.sent == [(ip, BootType.AUTO), (ip, BootType.REBOOT), (ip, BootType.RESTART)]
    # The coordinator knows the last order: its watcher re-sends that one.
    assert lc.core.life[nid].order is BootType.RESTART
    assert server.ctx.live.state_of(nid)[0] == "PXEWAKEUP"


async def test_health_and_metrics(server: Server) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{server.url}/health") as r:
            h = await r.json()
        assert r.status == 200 and h["status"] == "ok" and h["nodes"] == 20
        assert "http" in h["services"] and isinstance(h["generation"], int)
        async with s.get(f"{server.url}/metrics") as r:
            text = await r.text()
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert 'bootherd_events_total{event="requests",protocol="http"}' in text
    assert "bootherd_inventory_nodes 20.0" in text


async def test_bind_failure_names_the_address(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        with pytest.raises(StartupError, match=f"http: cannot bind 127.0.0.1:{port}: Address already in use"):
            await start_server(tmp_path, port=port)
    finally:
        blocker.close()


async def test_reload_goes_through_the_coordinator_and_refuses_what_it_cannot_do(
        tmp_path: Path) -> None:
    from bootherd.imaging.store import ImageStore

    server = await start_server(tmp_path, extra={
        "imaging": {"mfs_kernel": "mfs/vmlinuz", "root": str(tmp_path / "images")}})
    try:
        raw = tmp_path / "disk.raw"
        make_file(raw, 3 << 20)
        cfg, live = server.ctx.config, server.ctx.live
        ImageStore(cfg.path(cfg.imaging.root), live.engine).create(str(raw), "img1",
                                                                   chunk_size=1 << 20)
        nid = sorted(live.snapshot.nodes)[0]
        url = f"{server.url}/api/reload"
        async with aiohttp.ClientSession(headers=auth(server)) as s:
            for body, status, words in (({"nodes": [nid]}, 400, "image"),
                                        ({"nodes": [], "image": "img1"}, 400, "nodes"),
                                        ({"nodes": [nid], "image": "nosuch"}, 400, "nosuch"),
                                        ({"nodes": ["nosuch9"], "image": "img1"}, 404, "nosuch9")):
                async with s.post(url, json=body) as r:
                    assert r.status == status and words in (await r.json())["error"], body
            async with s.post(url, json={"nodes": [nid], "image": "img1"}) as r:
                assert r.status == 202
                (res,) = (await r.json())["results"]
            assert res["ok"] and "power cycle" in res["result"], res
        assert server.ctx.live.state_of(nid)[0] == "RELOADSETUP"
        assert server.wiring.lifecycle.core.life[nid].reload == "img1"
        # Its next boot question is the imaging MFS.
        mac = live.snapshot.nodes[nid].interfaces[0].mac.replace(":", "-")
        async with aiohttp.ClientSession() as s, s.get(f"{server.url}/ipxe?mac={mac}") as r:
            script = await r.text()
        assert "mfs/vmlinuz" in script and "bootherd.image=img1" in script, script
    finally:
        await stop_server(server)
