"""The storm's simulated Redfish BMCs (bootherd.storm.bmc) driven by bootherd's own
Redfish driver (sushy), and a live storm powered on by `bootherd node power on`
through a running server, with hung nodes the recovery ladder brings back."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select
from storm_server import storm_server

from bootherd.config import load
from bootherd.inventory import ops
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine
from bootherd.inventory.snapshot import load as load_snapshot
from bootherd.power.controller import PowerController, PowerSettings
from bootherd.power.core import BmcTarget, PowerOp
from bootherd.power.drivers import make_drivers
from bootherd.procs import free_port
from bootherd.storm import bmc, report, runner
from bootherd.storm.net import Loss
from bootherd.storm.node import Env, SimNode


def env_nowhere() -> Env:
    """Nodes whose boot reaches the OS and then finds no TMCD (a closed port)."""
    dead = ("127.0.0.1", free_port())
    return Env(profile="optimized", phases=("os",), dhcp=dead, proxy=dead, dhcp_client_port=0,
               tftp=dead, bootinfo=dead, bootinfo_client_port=0, order_port=0, tmcd=[dead],
               http=dead, loss=Loss())


async def test_simulated_bmcs_answer_bootherd_s_redfish_driver_and_move_their_nodes():
    env = env_nowhere()
    nodes = [SimNode(f"sn{i}", "127.0.0.1", bytes(6), "x", 0.0) for i in range(3)]
    env.counts["off"] = 3
    farm = bmc.BmcFarm(nodes, env, "127.71.0.0/24", hung_share=0.34, seed=2)
    (hung,) = [n for n, b in farm.bmcs.items() if b.hung]
    await farm.start()
    targets = {n: BmcTarget(n, "redfish", farm.url(n), 0, bmc.USER, farm.password)
               for n in farm.bmcs}
    targets["bad"] = replace(targets["sn0"], node_id="bad", password="wrong")
    st = PowerSettings(timeout=5.0, max_concurrent=4, power_on_rate=0.0)
    pool = ThreadPoolExecutor(4)
    events: list = []

    async def load_(ids: list[str]) -> dict[str, BmcTarget]:
        return {i: targets[i] for i in ids}

    ctl = PowerController(st, load_, lambda *ev: events.append(ev), make_drivers(st, pool))
    try:
        status = await ctl.run(PowerOp.STATUS, list(targets))
        assert [r.power for r in status[:3]] == ["off"] * 3
        assert not status[3].ok and status[3].error == "auth"
        on = await ctl.run(PowerOp.ON, list(farm.bmcs), pxe=True)
        assert all(r.ok for r in on), on
        b = farm.bmcs[hung]
        assert b.power and b.node.state == "os"  # its kernel hangs: no TMCD, no failure
        await asyncio.sleep(0.3)
        assert b.node.state == "os" and b.hangs == 1
        await asyncio.sleep(2)  # the others find TMCD closed (refused, retried) and fail
        assert {farm.bmcs[n].node.state for n in farm.bmcs if n != hung} == {"failed"}
        (cyc,) = await ctl.run(PowerOp.CYCLE, [hung])
        assert cyc.ok and "PowerCycle" in cyc.message
        assert b.counts()["cycle"] == 1 and b.node.state != "off"
        (off,) = await ctl.run(PowerOp.OFF, ["sn0"])
        assert off.ok and farm.bmcs["sn0"].node.state == "off"
        assert (await ctl.run(PowerOp.STATUS, ["sn0"]))[0].power == "off"
    finally:
        pool.shutdown()
        await farm.stop()
    assert env.counts["off"] + env.counts["failed"] + env.counts["os"] == 3
    assert farm.refused >= 1


async def test_bad_requests_to_a_simulated_bmc_are_refused_not_crashing():
    import aiohttp

    env = env_nowhere()
    farm = bmc.BmcFarm([SimNode("sn0", "127.0.0.1", bytes(6), "x", 0.0)], env, "127.72.0.0/24")
    await farm.start()
    try:
        url = farm.url("sn0")
        auth = {"Authorization": aiohttp.encode_basic_auth(bmc.USER, farm.password)}
        async with aiohttp.ClientSession(headers=auth) as http:
            async with http.get(url + bmc.SYSTEM, headers={"Authorization": "Basic eDp5"}) as r:
                assert r.status == 401
            for body in (b"not json", b"[1]", json.dumps({"ResetType": "Explode"}).encode()):
                async with http.post(url + bmc.RESET, data=body) as r:
                    assert r.status == 400
            async with http.patch(url + bmc.SYSTEM, json={"Boot": {
                    "BootSourceOverrideTarget": "Floppy"}}) as r:
                assert r.status == 400
            async with http.get(url + bmc.SYSTEM) as r:
                assert (await r.json())["PowerState"] == "Off"
    finally:
        await farm.stop()
    assert farm.bmcs["sn0"].actions == []


# -- a live storm ---------------------------------------------------------------------

NODES = 100
HUNG = 0.05
CAP = 25.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # noqa: ANN001, ANN201
    """bootherd serve with every service, a fast watcher and the ladder, power capped."""
    work = tmp_path_factory.mktemp("stormbmc")
    extra = (f'[power]\npower_on_rate = {CAP}\ntimeout = 10.0\n'
             '[recovery]\nreboot_timeout = 30.0\npower_sync_rate = 0\n'
             '[states]\npxewakeup_timeout = 3.0\ncheck_interval = 0.5\nbooting_timeout = 10.0\n')
    with storm_server(work, NODES, "127.93.0.0/16", 4, extra=extra) as (conf, ports, _proc):
        yield work, conf, ports


def test_a_storm_powered_on_through_the_server_recovers_its_hung_nodes(server, monkeypatch):
    work, conf, ports = server
    monkeypatch.chdir(work)  # the config's paths are relative to the server's folder
    cfg = load(conf)
    snap = load_snapshot(make_engine(cfg.database_url))
    st = runner.Settings(nodes=NODES, relay_address="127.94.0.1", relay_port=ports["relay"],
                         seed=7, timeout=240.0, wait_timeout=60.0, tarball_bytes=64 * 1024,
                         rpm_bytes=16 * 1024, bmc_subnet="127.95.0.0/16", hung=HUNG,
                         power_on_cmd=[sys.executable, "-m", "bootherd.cli", "node", "power",
                                       "on", runner.NODES_ARG, "--json", "-c", str(conf)])
    started = time.time()
    raw = runner.run(cfg, snap, st)
    summary = report.summarize(raw)
    power = bmc.summarize(raw["power"], raw["nodes"], CAP)
    assert raw["power"]["power_on"]["rc"] == 0 and raw["power"]["power_on"]["ok"] == NODES
    assert summary["failed"] == 0, summary["failure_reasons"]
    assert power["hung"] == round(NODES * HUNG) and power["hung_recovered"] == power["hung"]
    assert set(power["cycles_of_hung_nodes"].values()) == {1}, power
    assert power["cycles_of_healthy_nodes"] == 0
    # The server's ramp (its POWER_ON events carry each command's start): never more
    # than the cap in a second (plus the one that opens it), the batch no faster than
    # the cap.  (The BMCs see each On after a few Redfish requests: with jitter.)
    assert power["server_sent"] == NODES and power["powered_on"] == NODES
    assert power["server_max_in_one_second"] <= CAP + 1
    assert power["server_ramp_s"] >= (NODES - 1) / CAP * 0.95
    engine = make_engine(cfg.database_url)
    try:
        for nid in power["cycles_of_hung_nodes"]:
            ev = [e for e in ops.node_events(engine, nid) if e["ts"] >= started]
            kinds = [(e["state"], e["source"]) for e in ev]
            assert ("REBOOTING", "ladder") in kinds and ("POWER_CYCLE", "ladder") in kinds
            assert kinds[-1] == ("ISUP", "tmcd")
        with engine.connect() as conn:
            rows = conn.execute(select(s.node_lifecycle.c.power_cycles,
                                       s.node_lifecycle.c.out_of_service)).all()
        assert all(r.power_cycles == 0 and r.out_of_service == "" for r in rows)
    finally:
        engine.dispose()
    bmc.plot_ramp(str(work / "ramp.png"), raw["power"], CAP)
    assert Path(work / "ramp.png").stat().st_size > 1000
