"""An operator's reboot through a running server's recovery ladder: `bootherd node
reboot` and the admin API's reboot, against a real BMC (OpenIPMI's ipmi_sim on
loopback).  An ISUP node gets its IPOD first (the soft step); when it shows no
boot contact, the ladder power-cycles it over IPMI LAN, and gives up after the
configured cycles; a node without a BMC is refused with the reason, unchanged."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path

import aiohttp
import pytest
from bmc_helpers import PASSWORD, USER, need_ipmi_sim, start_ipmi_sim
from sqlalchemy import delete, select, update
from test_power_cli import cli, start_server

from bootherd import config as configmod
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.power.client import find_server
from bootherd.procs import free_port

pytestmark = pytest.mark.slow

SUBNET = "127.73.0"
REBOOT_TIMEOUT = 2.0


def tmcd(node_ip: str, port: int, line: str) -> str:
    """A TMCD request from the node's own address (TMCD knows a node by it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(node_ip, 0)) as c:
        c.sendall(line.encode() + b"\n")
        out = b""
        while chunk := c.recv(65536):
            out += chunk
    return out.decode()


def events(engine, node_id: str) -> list[tuple[str, str, str]]:  # noqa: ANN001
    e = s.node_events
    with engine.connect() as c:
        return [tuple(r) for r in c.execute(select(e.c.state, e.c.source, e.c.detail)
                                            .where(e.c.node_id == node_id).order_by(e.c.id))]


def until(what: str, pred, timeout: float = 20.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch):  # noqa: ANN001, ANN201
    need_ipmi_sim()
    sim = start_ipmi_sim(tmp_path / "bmc")
    engine = make_engine(f"sqlite:///{tmp_path}/inv.db")
    upgrade(engine)
    monkeypatch.setenv("BOOTHERD_BMC_PASSWORD", PASSWORD)
    import_testbed(engine, generate(3, subnet=f"{SUBNET}.0/24", bmc="ipmi"))
    with engine.begin() as conn:  # pc1's BMC is the simulator; pc2 has none
        conn.execute(update(s.node_power).where(s.node_power.c.node_id == "pc1").values(
            address="127.0.0.1", port=sim.port, user=USER, password=PASSWORD))
        conn.execute(delete(s.node_power).where(s.node_power.c.node_id == "pc2"))
    tmcd_port = free_port()
    conf = tmp_path / "bootherd.toml"
    conf.write_text(
        f'[server]\npublic_address = "127.0.0.1"\n'
        f'[database]\nurl = "sqlite:///{tmp_path}/inv.db"\npoll_interval = 0.1\n'
        f'[http]\nport = {free_port()}\nadmin_token_file = "{tmp_path}/token"\n'
        f'log_dir = "{tmp_path}/logs"\n'
        f'[tmcd]\naddress = "127.0.0.1"\nport = {tmcd_port}\nfallback_port = 0\n'
        f'ipod_secret_file = "{tmp_path}/ipod-secret"\n'
        '[states]\ncheck_interval = 0.2\n'
        f'[recovery]\nreboot_timeout = {REBOOT_TIMEOUT}\npower_cycles = 1\n'
        'power_sync_rate = 0\n'
        '[power]\ntimeout = 5.0\n')
    server = start_server(conf, only="http,tmcd")
    try:
        yield conf, engine, sim, tmcd_port
    finally:
        server.send_signal(signal.SIGTERM)
        print(server.communicate(timeout=30)[0][-3000:], events(engine, "pc1"),
              sim.commands())  # shown when a test fails
        engine.dispose()
        sim.stop()


def test_an_operator_reboot_tries_ipod_then_power_cycles_over_ipmi(deployment) -> None:  # noqa: ANN001
    conf, engine, sim, tmcd_port = deployment
    assert sim.ipmitool("chassis", "power", "on").returncode == 0  # the node runs
    tmcd(f"{SUBNET}.2", tmcd_port, "state ISUP")  # pc1
    until("pc1 ISUP", lambda: ("ISUP", "tmcd") in [e[:2] for e in events(engine, "pc1")])
    n = len(sim.commands())
    r = cli("node", "reboot", "pc1", "--json", conf=conf)
    assert r.returncode == 0, r.stdout + r.stderr
    (res,) = json.loads(r.stdout)["results"]
    assert res["ok"] and res["step"] == "ipod", res
    # The node answers its ping (loopback) but its kernel ignores the IPOD: no boot
    # contact within reboot_timeout, so the ladder power-cycles it through its BMC.
    until("the power cycle over IPMI", lambda: ("power", "0") in
          [c[1:] for c in sim.commands()[n:]])
    assert ("boot", "pxe") in [c[1:] for c in sim.commands()[n:]]
    # Still no boot contact after the one cycle allowed: failed, out of service.
    until("pc1 BOOTFAILED", lambda: "BOOTFAILED" in [e[0] for e in events(engine, "pc1")],
          timeout=REBOOT_TIMEOUT * 2 + 15)
    h = events(engine, "pc1")
    steps = [(st, d) for st, src, d in h if src == "ladder"]
    assert steps[:2] == [("REBOOTING", "IPOD sent (reboot asked by operator)"),
                         ("IPOD", f"IPOD sent to pc1 at {SUBNET}.2: reboot asked by operator")], h
    assert steps[2][0] == "REBOOTING" and steps[2][1].startswith(
        "power cycle 1 of 1: no boot contact"), steps
    assert steps[3][0] == "POWER_CYCLE" and "power cycle accepted" in steps[3][1], steps
    assert PASSWORD not in steps[3][1]
    assert steps[4][0] == "BOOTFAILED" and "1 power cycle did not bring it up" in steps[4][1]
    assert steps[5][0] == "OUT_OF_SERVICE", steps
    with engine.connect() as c:
        out = c.execute(select(s.node_lifecycle.c.out_of_service)
                        .where(s.node_lifecycle.c.node_id == "pc1")).scalar()
    assert "did not bring it up" in out


async def test_a_reboot_of_a_node_without_a_bmc_fails_with_the_reason(deployment) -> None:  # noqa: ANN001
    conf, engine, sim, tmcd_port = deployment
    before = events(engine, "pc2")
    r = cli("node", "reboot", "pc2", "pc1", conf=conf)
    assert r.returncode == 1, r.stdout + r.stderr  # pc2 refused, pc1 (a BMC) cycled
    assert "pc2: FAILED: cannot reboot pc2: no soft step possible (no state) and no BMC " \
        "in the inventory to power-cycle it" in r.stdout, r.stdout
    assert "pc1: power_cycle: power cycle 1 of 1: reboot asked by operator" in r.stdout
    url, token = find_server(configmod.load(conf))
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/api/nodes/pc2/reboot", headers=auth) as resp:
            assert resp.status == 409
            assert "no BMC in the inventory" in (await resp.json())["error"]
        async with http.post(f"{url}/api/reboot", headers=auth, json={"nodes": ["ghost"]}) as resp:
            assert resp.status == 404
        async with http.post(f"{url}/api/reboot", headers=auth, json={"nodes": "pc2"}) as resp:
            assert resp.status == 400
    time.sleep(0.5)
    assert events(engine, "pc2") == before  # refused: not failed, not out of service
