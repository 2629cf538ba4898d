"""The admin API, entry by entry: nodes, interfaces, users, groups, OS images, node types
and experiments added, changed and removed with import's rules, errors with their next
step, every change audited and logged by the server with origin=api; the spec covers
every route."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from web_helpers import (
    Server,
    server_fixture,  # noqa: F401 - fixtures
)


def auth(s: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {s.token}"}


async def test_a_node_added_changed_and_removed_through_the_api(
        server: Server, caplog: pytest.LogCaptureFixture) -> None:
    u = server.url
    async with aiohttp.ClientSession(headers=auth(server)) as s:
        async with s.post(f"{u}/api/nodes", json={"node_id": "ra1", "type": "r650"}) as r:
            assert r.status == 404
            body = await r.json()
            assert body["error"] == "no type 'r650'" and "bootherd type add r650" in body["hint"]
        async with s.post(f"{u}/api/node-types", json={"name": "r650",
                                                      "loader_bios": "undionly.kpxe"}) as r:
            assert r.status == 201
        async with s.post(f"{u}/api/nodes", json={"node_id": "ra1", "type": "r650",
                                                 "default_os": "UBUNTU22-64-STD"}) as r:
            assert r.status == 201 and (await r.json())["changes"] == ["+ node ra1"]
        async with s.post(f"{u}/api/nodes/ra1/interfaces", json={
                "mac": "02:aa:00:00:00:01", "ip": "127.20.0.201", "mask": "255.255.255.0",
                "role": "ctrl"}) as r:
            assert r.status == 201, await r.text()
        # Typed as in the file: a string where a number belongs is refused.
        async with s.patch(f"{u}/api/interfaces/02:aa:00:00:00:01", json={"speed": "fast"}) as r:
            assert r.status == 400 and "expected int" in (await r.json())["error"]
        async with s.patch(f"{u}/api/nodes/ra1", json={"next_os": "FRISBEE-MFS"}) as r:
            assert r.status == 200 and (await r.json())["next_os"] == "FRISBEE-MFS"
        async with s.patch(f"{u}/api/nodes/ra1", json={"next_os": "LINUX-NETBOOT"}) as r:
            assert r.status == 409 and "kernels/vmlinuz" in (await r.json())["error"]
        async with s.patch(f"{u}/api/nodes/ra1?force=true", json={"next_os": "LINUX-NETBOOT"}) as r:
            assert r.status == 200
        # The running server sees the new node and its address.
        for _ in range(100):
            if "127.20.0.201" in server.ctx.live.snapshot.by_ip:
                break
            await asyncio.sleep(0.05)
        assert server.ctx.live.snapshot.by_ip["127.20.0.201"].node_id == "ra1"
        async with s.post(f"{u}/api/experiments/proj0/exp0/allocate",
                          json={"node_id": "ra1", "vname": "late"}) as r:
            assert r.status == 201
        async with s.delete(f"{u}/api/nodes/ra1") as r:
            assert r.status == 409
            assert "experiment free ra1" in (await r.json())["hint"]
        with caplog.at_level(logging.INFO, logger="bootherd.inventory"):
            async with s.delete(f"{u}/api/nodes/ra1?force=1") as r:
                assert r.status == 200
                texts = [c["text"] for c in (await r.json())["changes"]]
                assert "- node ra1" in texts and "~ experiment proj0/exp0: nodes -ra1" in texts
            for _ in range(100):
                if any(r.getMessage() == "inventory change" and r.fields["action"] == "remove"
                       for r in caplog.records):
                    break
                await asyncio.sleep(0.05)
        async with s.delete(f"{u}/api/interfaces/02:aa:00:00:00:01") as r:
            assert r.status == 404
    logged = [r.fields for r in caplog.records if r.getMessage() == "inventory change"]
    assert {"origin": "api", "who": "127.0.0.1", "action": "remove", "kind": "node",
            "key": "ra1"}.items() <= logged[-1].items()
    assert "- node ra1" in logged[-1]["detail"]


async def test_users_groups_images_and_experiments(server: Server) -> None:
    u = server.url
    async with aiohttp.ClientSession(headers=auth(server)) as s:
        async with s.post(f"{u}/api/users", json={"login": "alice", "uid": 30000,
                                                 "groups": ["rack"]}) as r:
            assert r.status == 404 and "bootherd group add rack" in (await r.json())["hint"]
        for path, entry in (("groups", {"name": "rack", "gid": 7100}),
                            ("users", {"login": "alice", "uid": 30000, "gid": 7100,
                                       "groups": ["rack"]}),
                            ("os-images", {"name": "DEBIAN12", "kind": "part", "partition": 2})):
            async with s.post(f"{u}/api/{path}", json=entry) as r:
                assert r.status == 201, await r.text()
        async with s.post(f"{u}/api/users", json={"login": "alice", "uid": 1}) as r:
            assert r.status == 409
        async with s.post(f"{u}/api/users", json={"login": "bob", "uid": 30000}) as r:
            assert r.status == 400 and "duplicate uid" in (await r.json())["error"]
        async with s.patch(f"{u}/api/users/alice", json={"shell": "/bin/zsh"}) as r:
            assert r.status == 200
            assert (await r.json())["changes"][0]["fields"] == ["shell"]
        async with s.get(f"{u}/api/users") as r:
            assert {x["login"]: x["shell"] for x in await r.json()}["alice"] == "/bin/zsh"
        async with s.post(f"{u}/api/experiments", json={"pid": "rack", "eid": "e1",
                                                       "creator": "alice"}) as r:
            assert r.status == 201
        async with s.patch(f"{u}/api/experiments/rack/e1", json={"startupcmd": "/run.sh"}) as r:
            assert r.status == 200
        async with s.delete(f"{u}/api/users/alice") as r:
            assert r.status == 400 and "unknown user 'alice'" in (await r.json())["error"]
        async with s.delete(f"{u}/api/experiments/rack/e1") as r:
            assert r.status == 200
        for path in ("users/alice", "groups/rack", "os-images/DEBIAN12"):
            async with s.delete(f"{u}/api/{path}") as r:
                assert r.status == 200, (path, await r.text())
        async with s.patch(f"{u}/api/groups/rack", json={"gid": 1}) as r:
            assert r.status == 404


def test_openapi_describes_every_route() -> None:
    import yaml
    from aiohttp import web

    from bootherd.web import api

    app = web.Application()
    api.add_routes(app)
    spec = yaml.safe_load(api.OPENAPI.read_text())["paths"]
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if route.method == "HEAD":
            continue
        assert path in spec, path
        assert route.method.lower() in spec[path], (route.method, path)
