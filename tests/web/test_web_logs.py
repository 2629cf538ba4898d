"""Node boot logs: identified by source address, size-limited, rotated, readable."""

from __future__ import annotations

import asyncio
import shutil

import aiohttp
import pytest
from web_helpers import (
    Server,
    server_fixture,  # noqa: F401 - fixtures
)

from bootherd.web.logs import list_logs, read_log


def node_session(ip: str) -> aiohttp.ClientSession:
    # Bind the node's own loopback address: the server sees it as the source.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(ip, 0)))


async def test_upload_list_read_rotate(server: Server) -> None:
    ip = server.node_ip(3)
    nid = server.ctx.live.snapshot.by_ip[ip].node_id
    cfg = server.ctx.config
    async with node_session(ip) as s:
        for i in range(5):
            method = s.put if i % 2 else s.post
            async with method(f"{server.url}/logs", data=f"boot {i}\n".encode()) as r:
                assert r.status == 201
                body = await r.json()
            assert body["node_id"] == nid and body["size"] == len(f"boot {i}\n")
            await asyncio.sleep(0.002)  # distinct timestamps keep the order obvious
    logs = list_logs(cfg, nid)
    assert len(logs) == 3  # logs_per_node = 3: the two oldest rotated away
    assert [read_log(cfg, nid, i) for i in range(3)] == ["boot 2\n", "boot 3\n", "boot 4\n"]
    assert read_log(cfg, nid) == "boot 4\n"
    assert read_log(cfg, nid, logs[0].name) == "boot 2\n"
    with pytest.raises(LookupError):
        read_log(cfg, nid, 7)
    assert list_logs(cfg, "pc-without-logs") == []
    with pytest.raises(ValueError):
        list_logs(cfg, "../etc")
    # and through the admin API
    h = {"Authorization": f"Bearer {server.token}"}
    async with aiohttp.ClientSession(headers=h) as s:
        async with s.get(f"{server.url}/api/nodes/{nid}/logs") as r:
            assert [x["name"] for x in await r.json()] == [li.name for li in logs]
        async with s.get(f"{server.url}/api/nodes/{nid}/logs/-1") as r:
            assert await r.text() == "boot 4\n"
        async with s.get(f"{server.url}/api/nodes/{nid}/logs/9") as r:
            assert r.status == 404


async def test_unknown_address_refused(server: Server) -> None:
    async with node_session("127.0.0.1") as s:  # the server's own address, not a node
        async with s.put(f"{server.url}/logs", data=b"who am i") as r:
            assert r.status == 403 and "not a known node" in await r.text()
    assert not (server.tmp / "nodelogs").exists() or not any((server.tmp / "nodelogs").iterdir())


async def test_oversize_upload_refused_and_nothing_lost(server: Server) -> None:
    ip = server.node_ip(5)
    nid = server.ctx.live.snapshot.by_ip[ip].node_id
    cfg = server.ctx.config
    limit = cfg.http.max_log_bytes
    async with node_session(ip) as s:
        async with s.put(f"{server.url}/logs", data=b"first boot\n") as r:
            assert r.status == 201
        # declared too big (Content-Length)
        async with s.put(f"{server.url}/logs", data=b"x" * (limit + 1)) as r:
            assert r.status == 413
            msg = await r.text()
        assert "max_log_bytes" in msg and str(limit) in msg

    async def chunked():  # size unknown up front: refused once the limit is passed
        for _ in range(limit // 4096 + 4):
            yield b"y" * 4096

    async with node_session(ip) as s:
        async with s.post(f"{server.url}/logs", data=chunked()) as r:
            assert r.status == 413
    async with node_session(ip) as s:  # exactly at the limit is fine
        async with s.put(f"{server.url}/logs", data=b"z" * limit) as r:
            assert r.status == 201
    logs = list_logs(cfg, nid)
    assert [read_log(cfg, nid, i)[:10] for i in range(len(logs))] == ["first boot", "z" * 10]
    leftovers = [p.name for p in (server.tmp / "nodelogs" / nid).iterdir()
                 if not p.name.endswith(".log")]
    assert leftovers == []
    assert server.ctx.metrics.protocol("http")["log_too_large"] == 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
async def test_curl_upload_as_a_node(server: Server, tmp_path) -> None:  # noqa: ANN001
    ip = server.node_ip(2)
    nid = server.ctx.live.snapshot.by_ip[ip].node_id
    f = tmp_path / "boot.log"
    f.write_text("kernel: hello\n")
    p = await asyncio.create_subprocess_exec(
        "curl", "-sf", "--interface", ip, "-T", str(f), f"{server.url}/logs",
        stdout=asyncio.subprocess.PIPE)
    out, _ = await p.communicate()
    assert p.returncode == 0 and nid.encode() in out
    assert read_log(server.ctx.config, nid) == "kernel: hello\n"
