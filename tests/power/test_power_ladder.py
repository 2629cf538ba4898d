"""The recovery ladder's actors against a real BMC (OpenIPMI's ipmi_sim on loopback):
the coordinator's watcher finds a hung node and its power cycle goes over IPMI
LAN, in the controller's priority lane, recorded in the node's history;
power-state sync learns a node is off; an operator's own power action holds the
ladder off.  (The ladder's rules themselves: tests/lifecycle/test_ladder.py.)"""

from __future__ import annotations

import asyncio
import json
import re
import time

import pytest
from bmc_helpers import PASSWORD, USER, IpmiSim, closed_port, need_ipmi_sim, start_ipmi_sim
from sqlalchemy import update

from bootherd.config import build
from bootherd.inventory import ops
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.metrics import Metrics
from bootherd.power.core import PowerOp
from bootherd.procs import free_port
from bootherd.service import Context, wire
from bootherd.states import State

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    need_ipmi_sim()
    s = start_ipmi_sim(tmp_path_factory.mktemp("ipmi_sim"))
    yield s
    s.stop()


@pytest.fixture
def engine(tmp_path, sim: IpmiSim, monkeypatch):  # noqa: ANN001, ANN201
    e = make_engine(f"sqlite:///{tmp_path}/i.db")
    upgrade(e)
    monkeypatch.setenv("BOOTHERD_BMC_PASSWORD", PASSWORD)
    import_testbed(e, generate(4, subnet="127.69.0.0/24", bmc="ipmi"))
    with e.begin() as conn:  # pc1's BMC is the simulator, pc2's does not answer
        conn.execute(update(s.node_power).where(s.node_power.c.node_id == "pc1").values(
            address="127.0.0.1", port=sim.port, user=USER, password=PASSWORD))
        conn.execute(update(s.node_power).where(s.node_power.c.node_id == "pc2").values(
            address="127.0.0.1", port=closed_port(), user=USER, password=PASSWORD))
    yield e
    e.dispose()


@pytest.fixture
async def running(engine):  # noqa: ANN001, ANN201
    cfg = build({"bootinfo": {"port": free_port(), "order_port": free_port(),
                              "client_port": free_port()},
                 "states": {"check_interval": 3600.0, "booting_timeout": 600.0},
                 "power": {"timeout": 4.0, "power_on_rate": 0.0},
                 "recovery": {"power_sync_rate": 0, "bmc_retry_interval": 30.0}})
    live = LiveInventory(engine, poll_interval=0.05, write_batch_interval=0.01, server_name="me")
    await live.start()
    w = wire(Context(cfg, live, Metrics(), server_name="me"), ["bootinfo"])
    await w.start()
    yield w
    await w.stop()
    await live.stop()


async def until(what: str, pred, timeout: float = 15.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        await asyncio.sleep(0.05)


async def history(w, nid: str) -> list[tuple[str, str, str]]:  # noqa: ANN001
    await asyncio.to_thread(w.ctx.live.writer.flush)
    return [(e["state"], e["source"], e["detail"]) for e in
            await asyncio.to_thread(ops.node_events, w.ctx.live.engine, nid)]


async def test_a_hung_node_is_power_cycled_over_ipmi_and_a_dead_bmc_retried(running, sim):
    w = running
    lc = w.lifecycle
    assert lc.actors is not None
    (await w.power.run(PowerOp.ON, ["pc1"], source="ladder"))  # on, not by an operator
    n = len(sim.commands())
    lc.execute(lc.core.record("pc1", State.BOOTING, "bootinfo", "", 1000.0))
    lc.execute(lc.core.record("pc2", State.BOOTING, "bootinfo", "", 1000.0))
    lc.clock = lambda: 1700.0
    assert sorted(await lc.check_once()) == [("pc1", "power_cycle"), ("pc2", "power_cycle")]
    await until("both BMCs answered", lambda: all(
        lc.core.life[n].deferred_until in (0.0, 1730.0) for n in ("pc1", "pc2")))
    # ipmi_sim's cycle: off at once (then on after its timer), one-time PXE boot first.
    assert ("boot", "pxe") in [c[1:] for c in sim.commands()[n:]]
    assert ("power", "0") in [c[1:] for c in sim.commands()[n:]]
    h1 = await history(w, "pc1")
    assert ("REBOOTING", "ladder", "power cycle 1 of 3: in BOOTING for 700 s") in h1
    (cycle,) = [h for h in h1 if h[0] == "POWER_CYCLE"]
    assert cycle[1] == "ladder" and PASSWORD not in cycle[2]
    assert lc.core.life["pc1"].cycles == 1
    # pc2's BMC is silent: a retry in 30 s, the cycle not counted.
    h2 = await history(w, "pc2")
    (retry,) = [h for h in h2 if h[0] == "POWER_RETRY"]
    assert re.match(r"BMC (unreachable|timeout): power cycle tried again in 30 s \(1 of 5\)",
                    retry[2]), retry
    assert lc.core.life["pc2"].cycles == 0 and "pc2" in lc.core.rechecks


async def test_power_sync_finds_a_node_off_and_an_operator_s_action_holds_the_ladder(running,
                                                                                    sim):
    w = running
    lc = w.lifecycle
    await asyncio.sleep(1.5)  # a cycle of the other test has ended (ipmi_sim's 1 s timer)
    await w.power.run(PowerOp.OFF, ["pc1"], source="cli")  # an operator, by hand
    assert sim.power() == "off"
    now = time.time()
    lc.clock = lambda: now
    lc.execute(lc.core.record("pc1", State.BOOTING, "bootinfo", "", now - 700))
    lc.execute(lc.core.record("pc3", State.BOOTING, "bootinfo", "", now - 700))
    await asyncio.to_thread(w.ctx.live.writer.flush)
    assert await lc.check_once() == [("pc3", "power_cycle")]  # pc1 is held: not fought
    assert lc.core.life["pc1"].deferred_until > now + 500
    asked = await lc.actors.sync_once(rate=50.0)
    assert asked >= 1
    await until("pc1 SHUTDOWN", lambda: lc.core.states["pc1"][0] == State.SHUTDOWN)
    assert lc.core.life["pc1"].power == "off"
    h = await history(w, "pc1")
    assert ("SHUTDOWN", "powersync", "the BMC says power is off (was BOOTING)") in h


def test_an_operator_s_power_on_after_the_off_ends_the_hold(engine):  # noqa: ANN001
    """Off by hand, then on by hand: the boot that starts is the watcher's again (a hung
    one is cycled); an off or soft off alone holds; the ladder's own off holds nothing."""
    from bootherd.lifecycle.store import records

    now = time.time()

    def log(nid: str, state: str, source: str, ago: float) -> None:
        with engine.begin() as conn:
            conn.execute(s.node_events.insert().values(node_id=nid, state=state,
                                                       source=source, ts=now - ago))

    log("pc1", "POWER_OFF", "cli", 20)
    log("pc1", "POWER_ON", "cli", 10)
    log("pc2", "POWER_OFF", "api", 20)
    log("pc3", "POWER_ON", "cli", 30)
    log("pc3", "POWER_SOFT", "ui", 20)
    log("pc4", "POWER_OFF", "ladder", 20)
    recs = records(engine, ["pc1", "pc2", "pc3", "pc4"], now, operator_hold=600.0)
    assert {n: round(now - r.operator_power_at) if r.operator_power_at else None
            for n, r in recs.items()} == {"pc1": None, "pc2": 20, "pc3": 20, "pc4": None}


async def test_a_recovery_cycle_overtakes_a_bulk_power_on_but_keeps_the_ramp():
    """The priority lane: a bulk power-on of 30 nodes at 20/s is under way; the
    ladder's cycle of another node starts next in the ramp, not after the 30."""
    from concurrent.futures import ThreadPoolExecutor

    from bootherd.power.controller import PowerController, PowerSettings
    from bootherd.power.core import BmcTarget
    from bootherd.power.drivers import make_drivers

    st = PowerSettings(timeout=4.0, max_concurrent=4, power_on_rate=20.0)
    pool = ThreadPoolExecutor(2)
    targets = {f"n{i}": BmcTarget(f"n{i}", "manual") for i in range(31)}
    starts: list[tuple[str, float]] = []

    async def load(ids: list[str]) -> dict[str, BmcTarget]:
        return {i: targets[i] for i in ids}

    ctl = PowerController(st, load, lambda *ev: None, make_drivers(st, pool),
                          monotonic=time.monotonic)
    try:
        bulk = asyncio.ensure_future(ctl.run(
            PowerOp.ON, [f"n{i}" for i in range(1, 31)], source="cli",
            on_result=lambda r: starts.append((r.node_id, time.monotonic()))))
        await until("the ramp under way", lambda: len(starts) >= 3)
        (res,) = await ctl.run(PowerOp.CYCLE, ["n0"], priority=True, source="ladder",
                               on_result=lambda r: starts.append((r.node_id, time.monotonic())))
        await bulk
    finally:
        pool.shutdown()
    order = [n for n, _ in starts]
    assert res.ok and len(order) == 31 and order.index("n0") <= 5, order


def test_migration_0019_goes_down_and_up_keeping_the_lifecycle_rows(db_url):  # noqa: ANN001
    from alembic import command
    from sqlalchemy import insert, inspect, select

    from bootherd.inventory.db import _alembic_config

    e = make_engine(db_url)
    try:
        upgrade(e)
        cols = {c["name"] for c in inspect(e).get_columns("node_lifecycle")}
        assert {"power_cycles", "out_of_service", "out_since", "out_by"} <= cols
        with e.begin() as conn:
            conn.execute(insert(s.node_lifecycle).values(node_id="pc1", config_digest="d1",
                                                         power_cycles=2, out_of_service="x"))
        cfg = _alembic_config(e)
        with e.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0006")
        cols = {c["name"] for c in inspect(e).get_columns("node_lifecycle")}
        assert "power_cycles" not in cols and "out_of_service" not in cols
        upgrade(e)
        with e.connect() as conn:
            row = conn.execute(select(s.node_lifecycle)).mappings().one()
        assert (row["config_digest"], row["power_cycles"], row["out_of_service"]) == ("d1", 0, "")
    finally:
        e.dispose()


def test_an_operator_lists_takes_out_and_clears_out_of_service_nodes(tmp_path, monkeypatch):
    """`bootherd node service`: what the coordinator confirms a candidate against."""
    import subprocess
    import sys

    from bootherd.lifecycle import store

    monkeypatch.setenv("BOOTHERD_BMC_PASSWORD", PASSWORD)
    url = f"sqlite:///{tmp_path}/i.db"
    e = make_engine(url)
    upgrade(e)
    import_testbed(e, generate(3, subnet="127.69.0.0/24", bmc="ipmi"))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bootherd.cli", "node", "service", *args,
                               "--db", url], capture_output=True, text=True, timeout=60)

    try:
        assert cli("out", "pc2").returncode != 0  # a reason is required
        r = cli("out", "pc2", "--reason", "PSU fan noise")
        assert r.returncode == 0 and "out of service (PSU fan noise)" in r.stdout
        rows = json.loads(cli("list", "--json").stdout)
        assert [(x["node_id"], x["out_of_service"], x["out_by"]) for x in rows] == [
            ("pc2", "PSU fan noise", "cli")]
        rec = store.records(e, ["pc2", "pc3"], time.time())
        assert rec["pc2"].out_of_service == "PSU fan noise" and rec["pc3"].out_of_service == ""
        assert rec["pc2"].power_driver == "ipmi"
        assert cli("in", "pc2").returncode == 0
        assert json.loads(cli("list", "--json").stdout) == []
        assert [h["state"] for h in ops.node_events(e, "pc2")] == ["OUT_OF_SERVICE", "IN_SERVICE"]
        bad = cli("in", "pc99")
        assert bad.returncode != 0 and "no node 'pc99'" in bad.stderr
    finally:
        e.dispose()
