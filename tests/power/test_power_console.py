"""Console capture through `bootherd serve --only http,console`: a console server's
TCP port (a shell on a pseudo-terminal) captured to the node's console log and
rotated, attached by several operators with one writer, the CLI's interactive
`node console` on a real terminal, and a console that goes away and comes back."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from bmc_helpers import die_with_parent

from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.procs import free_port, terminate

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def start_console_server(port: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, str(HERE / "pty_console.py"), str(port)],
                         stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    assert p.stdout.readline().strip() == "READY"
    return p


def with_consoles(text: str, consoles: dict[str, str]) -> str:
    import tomllib

    import tomli_w

    doc = tomllib.loads(text)
    for n in doc["nodes"]:
        if n["node_id"] in consoles:
            n["power"] = {"driver": "manual", "console": consoles[n["node_id"]]}
    return tomli_w.dumps(doc)


@pytest.fixture
def deployment(tmp_path: Path):  # noqa: ANN201
    port = free_port()
    console = start_console_server(port)
    url = f"sqlite:///{tmp_path}/inv.db"
    engine = make_engine(url)
    upgrade(engine)
    import_testbed(engine, with_consoles(generate(3), {"pc1": f"tcp:127.0.0.1:{port}",
                                                        "pc2": f"tcp:127.0.0.1:{free_port()}"}))
    engine.dispose()
    conf = tmp_path / "bootherd.toml"
    conf.write_text(f'[database]\nurl = "{url}"\n'
                    f'[http]\nport = {free_port()}\nadmin_token_file = "{tmp_path}/token"\n'
                    f'log_dir = "{tmp_path}/logs"\n'
                    '[console]\nenabled = true\nlog_bytes = 4096\nlogs_kept = 2\n'
                    'reconnect_max = 1.0\nrescan_interval = 1.0\n')
    server = subprocess.Popen([sys.executable, "-m", "bootherd.cli", "serve", "-c", str(conf),
                               "--only", "http,console"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    while "bootherd ready" not in (line := server.stdout.readline()):
        assert line or server.poll() is None, "server did not start"
    holder = {"console": console}
    try:
        yield tmp_path, conf, port, holder
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=30)
        terminate(holder["console"], 5)


def cli(conf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bootherd.cli", *args, "-c", str(conf)],
                          cwd=conf.parent, capture_output=True, text=True, timeout=60)


async def api(conf: Path) -> tuple[str, dict]:
    from bootherd import config as configmod
    from bootherd.power.client import find_server

    url, token = find_server(configmod.load(conf))
    return url, {"Authorization": f"Bearer {token}"}


async def consoles(http: aiohttp.ClientSession, url: str, auth: dict) -> dict:
    async with http.get(f"{url}/api/consoles", headers=auth) as r:
        assert r.status == 200
        return {c["node_id"]: c for c in await r.json()}


async def until(pred, timeout: float = 20.0) -> None:  # noqa: ANN001
    end = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.2)


def connected(http: aiohttp.ClientSession, url: str, auth: dict, node: str = "pc1",
              want: bool = True):  # noqa: ANN201
    """A condition for until(): the capture of `node` is (or is not) connected."""
    async def check() -> bool:
        return (await consoles(http, url, auth))[node]["connected"] is want
    return check


class Viewer:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws, self.text, self.notices = ws, b"", []

    async def read_until(self, needle: bytes, timeout: float = 15.0) -> bytes:
        end = time.monotonic() + timeout
        while needle not in self.text:
            left = end - time.monotonic()
            assert left > 0, f"{needle!r} not seen; got {self.text[-300:]!r}"
            msg = await self.ws.receive(timeout=left)
            if msg.type == aiohttp.WSMsgType.BINARY:
                self.text += msg.data
            elif msg.type == aiohttp.WSMsgType.TEXT:
                self.notices.append(json.loads(msg.data))
            else:
                raise AssertionError(f"websocket ended: {msg}")
        return self.text


async def test_capture_log_rotation_and_one_writer(deployment) -> None:  # noqa: ANN001
    tmp, conf, port, holder = deployment
    url, auth = await api(conf)
    async with aiohttp.ClientSession() as http:
        await until(connected(http, url, auth))
        down = (await consoles(http, url, auth))["pc2"]
        assert not down["connected"] and "Connect" in down["error"]

        a = Viewer(await http.ws_connect(f"{url}/api/nodes/pc1/console?write=1&who=alice",
                                         headers=auth))
        b = Viewer(await http.ws_connect(f"{url}/api/nodes/pc1/console?write=1&who=bob",
                                         headers=auth))
        first_a = await a.ws.receive_json()
        first_b = await b.ws.receive_json()
        assert first_a["write"] is True
        assert first_b["write"] is False and "alice" in first_b["writer"]
        await a.ws.send_bytes(b"echo hi-$((6*7))\n")
        await a.read_until(b"hi-42")
        await b.read_until(b"hi-42")  # readers see the writer's session live
        await b.ws.send_bytes(b"echo nope-$((1+1))\n")
        await b.read_until(b"node$")  # (any output) then the refusal notice
        for _ in range(20):
            if any(n["type"] == "read-only" for n in b.notices):
                break
            msg = await b.ws.receive(timeout=5)
            if msg.type == aiohttp.WSMsgType.TEXT:
                b.notices.append(json.loads(msg.data))
        assert any(n["type"] == "read-only" and "alice" in n["writer"] for n in b.notices)
        # Enough output to rotate the 4 KiB log twice over.
        await a.ws.send_bytes(b"i=0; while [ $i -lt 200 ]; do echo line-$i-................"
                              b"..............................; i=$((i+1)); done; echo end-$((9*9))\n")
        await a.read_until(b"end-81")
        await a.ws.close()
        # The writer left: the next operator to ask may write.
        c = Viewer(await http.ws_connect(f"{url}/api/nodes/pc1/console?write=1&who=carol",
                                         headers=auth))
        assert (await c.ws.receive_json())["write"] is True
        await c.ws.close()
        await b.ws.close()
        async with http.get(f"{url}/api/nodes/pc1/logs", headers=auth) as r:
            names = [x["name"] for x in await r.json()]
    assert names == ["console", "console.1", "console.2"], names
    log = cli(conf, "node", "logs", "pc1", "console")
    assert log.returncode == 0 and "end-81" in log.stdout
    old = cli(conf, "node", "logs", "pc1", "console.2")
    assert old.returncode == 0 and "line-" in old.stdout
    assert "nope-2" not in log.stdout + old.stdout, "a reader's keys reached the console"
    assert all(p.stat().st_size <= 4096 for p in (tmp / "logs/pc1/console").iterdir())


async def test_cli_console_on_a_terminal_and_a_console_that_comes_back(deployment) -> None:  # noqa: ANN001
    tmp, conf, port, holder = deployment
    url, auth = await api(conf)
    async with aiohttp.ClientSession() as http:
        await until(connected(http, url, auth))
        # The console server goes away (power cycle of a terminal server) and returns.
        terminate(holder["console"], 5)
        await until(connected(http, url, auth, want=False))
        holder["console"] = start_console_server(port)
        await until(connected(http, url, auth))

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "bootherd.cli", "node", "console",  # noqa: ASYNC220
                             "pc1", "-c", str(conf)], cwd=tmp, stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True)
    os.close(slave)
    seen = b""

    def read_until(needle: bytes, timeout: float = 20.0) -> None:
        nonlocal seen
        end = time.monotonic() + timeout
        while needle not in seen:
            assert time.monotonic() < end, f"{needle!r} not seen: {seen[-400:]!r}"
            import select

            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break

    try:
        read_until(b"console attached, writing")
        os.write(master, b"echo cli-$((2+3))\r")
        read_until(b"cli-5")
        os.write(master, b"\x1d")  # Ctrl-]
        read_until(b"detached")
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    log = cli(conf, "node", "logs", "pc1", "console")
    assert "cli-5" in log.stdout
