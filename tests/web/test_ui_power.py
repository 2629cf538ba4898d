"""The console's power actions and a node's serial console, over HTTP against a real
`service.wire`d server: power status, on, off and cycle of a node behind OpenIPMI's
ipmi_sim (a real IPMI BMC on loopback), recorded as the node's events; a node with no
power driver and a BMC that refuses the password are refused with a sentence; the
console of a node behind a console server's TCP port (a shell on a pseudo-terminal) is
shown on its page and followed live as text while an operator types on it through the
admin API's websocket; sign-out ends the follower."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import pytest
from test_ui_http import _read_events, client, no_traceback, sign_in
from web_helpers import start_server, stop_server

from bootherd.inventory import ops
from bootherd.procs import free_port, terminate

sys.path.insert(0, str(Path(__file__).parents[1] / "power"))
from bmc_helpers import PASSWORD, USER, need_ipmi_sim, start_ipmi_sim  # noqa: E402
from test_power_console import start_console_server  # noqa: E402


@pytest.fixture
def bmc(tmp_path: Path):  # noqa: ANN201
    need_ipmi_sim()
    sim = start_ipmi_sim(tmp_path / "bmc")
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def console_port():  # noqa: ANN201
    port = free_port()
    proc = start_console_server(port)
    try:
        yield port
    finally:
        terminate(proc, 5)


async def _events(engine, node: str, since: float) -> list[dict]:  # noqa: ANN001
    rows = await asyncio.to_thread(ops.node_events, engine, node, 50)
    return [e for e in rows if e["ts"] >= since]


async def test_power_actions_on_a_real_bmc_and_the_live_console(tmp_path: Path, bmc,  # noqa: ANN001
                                                               console_port: int) -> None:
    ipmi = {"driver": "ipmi", "address": "127.0.0.1", "port": bmc.port, "user": USER,
            "password": PASSWORD}
    power = {"pc1": {**ipmi, "console": f"tcp:127.0.0.1:{console_port}"},
             "pc2": {**ipmi, "password": "not-the-password"}}
    s = await start_server(tmp_path, power=power, services=("http", "console"),
                           extra={"console": {"enabled": True, "reconnect_max": 1.0,
                                              "rescan_interval": 1.0},
                                  "power": {"timeout": 10.0}})
    engine = s.ctx.live.engine
    try:
        async with client() as c:
            csrf = await sign_in(c, s)
            j = {"Accept": "application/json", "X-CSRF-Token": csrf}
            page = await (await c.get(s.url + "/ui/nodes/pc1")).text()
            for name in ("power-status", "power-on", "power-off", "power-cycle"):
                assert f'id="action-{name}"' in page
            assert f"ipmi 127.0.0.1:{bmc.port}" in page and PASSWORD not in page

            async def act(node: str, name: str) -> tuple[int, dict]:
                r = await c.post(f"{s.url}/ui/nodes/{node}/actions/{name}",
                                 data={"confirmed": "1"}, headers=j)
                return r.status, await r.json()

            watch = await c.get(s.url + "/ui/events?node=pc1")
            await _read_events(watch, "hello")
            t0 = time.time()
            assert bmc.power() == "off"
            st, body = await act("pc1", "power-on")
            assert st == 200 and "power is on" in body["result"], body
            assert bmc.power() == "on"
            st, body = await act("pc1", "power-status")
            assert st == 200 and "power is on" in body["result"], body
            st, body = await act("pc1", "power-off")
            assert st == 200 and bmc.power() == "off", body
            st, body = await act("pc1", "power-cycle")
            assert st == 200 and bmc.power() == "on", body
            sent = [(what, value) for ts, what, value in bmc.commands() if ts >= t0 - 1]
            assert sent[:2] == [("power", "1"), ("power", "0")] and ("power", "1") in sent[2:]
            # Each operation is the node's history, by the console ("ui"); a status is not.
            async def recorded() -> list[str]:
                return [e["state"] for e in await _events(engine, "pc1", t0)
                        if e["source"] == "ui"]
            for _ in range(50):
                if len(await recorded()) >= 3:
                    break
                await asyncio.sleep(0.1)
            assert sorted(await recorded()) == ["POWER_CYCLE", "POWER_OFF", "POWER_ON"]
            # The node's page heard them as they happened: notes, not where the node is.
            pushed = await _read_events(watch, "node", until=lambda d: any(
                e["state"] == "POWER_ON" for e in d))
            assert [e["note"] for e in pushed if e["state"] == "POWER_ON"] == [True]
            watch.close()

            # Refusals: no power driver in the inventory (not offered on its page, and
            # refused if posted anyway), a BMC that refuses the password.
            page = await (await c.get(s.url + "/ui/nodes/pc3")).text()
            assert re.search(r'id="action-power-cycle">.*?<button type="submit" disabled '
                             r'title="no power driver in the inventory', page, re.S)
            assert page.count("no power driver in the inventory ([nodes.power])</span>") == 1
            st, body = await act("pc3", "power-cycle")
            assert st == 409 and "no power driver" in body["error"], body
            st, body = await act("pc2", "power-on")
            assert st == 502 and "(auth)" in body["error"] and PASSWORD not in body["error"]
            r = await c.post(f"{s.url}/ui/nodes/pc3/actions/power-off",
                             data={"csrf": csrf, "confirmed": "1"})
            text = await r.text()
            assert r.status == 409 and "Power off refused" in text
            no_traceback(text)

            # The console: captured by this server, followed as text while someone types.
            for _ in range(100):
                con = s.wiring["console"].consoles.get("pc1")
                if con is not None and con.link is not None:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("pc1's console was not connected")
            page = await (await c.get(s.url + "/ui/nodes/pc1")).text()
            assert 'id="console-text" data-live="1"' in page and "connected since" in page
            follow = await c.get(s.url + "/ui/nodes/pc1/console/events")
            assert follow.status == 200
            backlog = await _read_events(follow, "backlog")
            assert backlog["status"]["connected"] is True
            api = client()
            ws = await api.ws_connect(s.url + "/api/nodes/pc1/console?write=1",
                                      headers={"Authorization": f"Bearer {s.token}"})
            try:
                attached = await ws.receive_json(timeout=10)
                assert attached["write"] is True
                # Colour escapes and CR LF from the node arrive as plain text.
                await ws.send_bytes(b"printf 'console \\033[1;32msays\\033[0m hello\\r\\n'\n")
                seen = ""
                while "console says hello\n" not in seen:
                    seen += (await _read_events(follow, "text"))["text"]
                assert "\x1b" not in seen and "\r" not in seen
            finally:
                await ws.close()
                await api.close()
            # The captured log, shown cleaned on its page and on the node page.
            log_page = await (await c.get(s.url + "/ui/nodes/pc1/logs/console")).text()
            assert "console says hello" in log_page and "\x1b" not in log_page
            page = await (await c.get(s.url + "/ui/nodes/pc1")).text()
            assert "console says hello" in page
            # A node whose console this server does not capture: a clear 404 for the stream.
            r = await c.get(s.url + "/ui/nodes/pc3/console/events")
            assert r.status == 404 and "not captured" in (await r.json())["error"]
            # Signing out ends the follower.
            await c.post(s.url + "/ui/logout", data={"csrf": csrf})
            async with asyncio.timeout(10):
                while await follow.content.readany():
                    pass
            assert not [a for a in con.attached if a.who.endswith("(web console)")]
            follow.close()
    finally:
        await stop_server(s)
