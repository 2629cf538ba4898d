"""IPMI over LAN against OpenIPMI's ipmi_sim: both drivers (pyghmi, ipmitool), the
power operations, one-time PXE boot, and BMCs that refuse, vanish or babble."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bmc_helpers import (
    CHASSIS_NO_BOOT,
    PASSWORD,
    USER,
    IpmiSim,
    Misbehaving,
    closed_port,
    need_ipmi_sim,
    start_ipmi_sim,
)

from bootherd.power.controller import PowerController, PowerSettings
from bootherd.power.core import BmcTarget, PowerOp
from bootherd.power.drivers import make_drivers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    need_ipmi_sim()
    s = start_ipmi_sim(tmp_path_factory.mktemp("ipmi_sim"))
    yield s
    s.stop()


def controller(targets: dict[str, BmcTarget], events: list, **settings: object
               ) -> tuple[PowerController, ThreadPoolExecutor]:
    st = PowerSettings(**{"timeout": 6.0, "max_concurrent": 8, "power_on_rate": 0.0,
                          **settings})  # type: ignore[arg-type]
    pool = ThreadPoolExecutor(max_workers=st.max_concurrent)

    async def load(ids: list[str]) -> dict[str, BmcTarget]:
        return {i: targets[i] for i in ids if i in targets}

    return PowerController(st, load, lambda *ev: events.append(ev), make_drivers(st, pool)), pool


@pytest.mark.parametrize("driver", ["ipmi", "ipmitool"])
async def test_power_operations_move_the_chassis(sim: IpmiSim, driver: str) -> None:
    node = BmcTarget("n1", driver, "127.0.0.1", sim.port, USER, PASSWORD)
    events: list = []
    ctl, pool = controller({"n1": node}, events)
    try:
        async def one(op: PowerOp, pxe: bool = False):  # noqa: ANN202
            (res,) = await ctl.run(op, ["n1"], pxe=pxe, source="test")
            assert res.ok, res
            return res

        await one(PowerOp.OFF)
        assert sim.power() == "off"
        assert (await one(PowerOp.STATUS)).power == "off"
        await one(PowerOp.ON, pxe=True)
        assert sim.power() == "on" and sim.boot() == "pxe"
        assert (await one(PowerOp.STATUS)).power == "on"
        n = len(sim.commands())
        res = await one(PowerOp.CYCLE)
        # ipmi_sim's power cycle: off at once, on again after its 1 s timer.
        assert [c[1:] for c in sim.commands()[n:n + 1]] == [("power", "0")]
        assert res.power == "on"
        await one(PowerOp.RESET)
        assert sim.commands()[-1][1] == "reset"
        await one(PowerOp.SOFT)
        assert sim.commands()[-1][1] == "shutdown"
        await one(PowerOp.OFF)
        assert sim.power() == "off"
        # A cycle of an off node powers it on.
        res = await one(PowerOp.CYCLE)
        assert "was off" in res.message and sim.power() == "on"
    finally:
        pool.shutdown()
    states = [e[1] for e in events]
    assert states == ["POWER_OFF", "POWER_ON", "POWER_CYCLE", "POWER_RESET", "POWER_SOFT",
                      "POWER_OFF", "POWER_CYCLE"], "status queries are not history"
    assert "one-time PXE boot set" in events[1][4]
    assert all(e[2] == "test" and PASSWORD not in e[4] for e in events)


@pytest.mark.parametrize("driver", ["ipmi", "ipmitool"])
async def test_bad_bmcs_give_clear_errors_in_time_and_spare_the_others(sim: IpmiSim,
                                                                       driver: str) -> None:
    bad = Misbehaving()
    try:
        garbage = bad.udp_garbage()
        targets = {
            "good": BmcTarget("good", driver, "127.0.0.1", sim.port, USER, PASSWORD),
            "badpw": BmcTarget("badpw", driver, "127.0.0.1", sim.port, USER, "wrong-password"),
            "baduser": BmcTarget("baduser", driver, "127.0.0.1", sim.port, "nobody", PASSWORD),
            "gone": BmcTarget("gone", driver, "127.0.0.1", closed_port(), USER, PASSWORD),
            "garbage": BmcTarget("garbage", driver, "127.0.0.1", garbage, USER, PASSWORD),
            "noaddr": BmcTarget("noaddr", driver, "", 0, USER, PASSWORD),
        }
        events: list = []
        timeout = 6.0
        ctl, pool = controller(targets, events, timeout=timeout)
        try:
            results = {r.node_id: r for r in await ctl.run(
                PowerOp.ON, [*targets, "unconfigured"], source="test")}
        finally:
            pool.shutdown(wait=False)
    finally:
        bad.close()
    assert results["good"].ok and sim.power() == "on", results["good"]
    want = {"badpw": "auth", "baduser": "auth", "gone": ("unreachable", "timeout"),
            "garbage": ("unreachable", "timeout"), "noaddr": "config", "unconfigured": "config"}
    for nid, kind in want.items():
        r = results[nid]
        assert not r.ok and r.error in ((kind,) if isinstance(kind, str) else kind), r
        # The controller's own timeout ends every attempt (a hang would be unbounded);
        # the slack is for an event loop starved by other work on a loaded machine.
        assert r.elapsed <= timeout + 3.0, f"{nid} took {r.elapsed:.1f} s (timeout {timeout})"
        assert PASSWORD not in r.message and "wrong-password" not in r.message
    assert "refused the credentials of user 'admin'" in results["badpw"].message
    assert "'nobody'" in results["baduser"].message
    assert f"127.0.0.1:{targets['gone'].port}" in results["gone"].message
    assert "has no address" in results["noaddr"].message
    assert "no power driver" in results["unconfigured"].message
    # Every attempt is in its node's history, failures with their reason.
    assert {e[0] for e in events} == set(want) | {"good"}
    assert all("failed (" in e[4] for e in events if e[0] != "good")


async def test_a_vm_bmc_refuses_a_boot_device_clearly(tmp_path: Path) -> None:
    """ipmi_sim with a VM's startcmd (no chassis program) has no boot options: the
    one-time PXE request fails with the BMC's own completion code, nothing powers on."""
    need_ipmi_sim()
    vm_sim = start_ipmi_sim(tmp_path / "vm", extra='  startcmd "/bin/true"\n  startnow false\n')
    try:
        events: list = []
        ctl, pool = controller({"n": BmcTarget("n", "ipmi", "127.0.0.1", vm_sim.port, USER,
                                               PASSWORD)}, events)
        try:
            (res,) = await ctl.run(PowerOp.ON, ["n"], pxe=True)
        finally:
            pool.shutdown()
        assert not res.ok and res.error == "refused", res
        assert "invalid data field" in res.message.lower()
        assert "off" in vm_sim.ipmitool("chassis", "power", "status").stdout
    finally:
        vm_sim.stop()



@pytest.mark.parametrize("driver", ["ipmi", "ipmitool"])
async def test_a_refused_boot_device_is_powered_anyway_when_optional(tmp_path: Path,
                                                                     driver: str) -> None:
    """The ladder's cycle (`pxe_optional`) through a BMC that refuses the one-time PXE
    boot: the node is cycled anyway and the answer says the boot device was refused;
    an operator's `--pxe` (not optional) is refused and powers nothing."""
    need_ipmi_sim()
    sim = start_ipmi_sim(tmp_path / "noboot", chassis=CHASSIS_NO_BOOT)
    try:
        events: list = []
        ctl, pool = controller({"n": BmcTarget("n", driver, "127.0.0.1", sim.port, USER,
                                               PASSWORD)}, events)
        try:
            (refused,) = await ctl.run(PowerOp.ON, ["n"], pxe=True)
            assert not refused.ok and refused.error == "refused", refused
            assert sim.power() == "off"
            (res,) = await ctl.run(PowerOp.CYCLE, ["n"], pxe=True, pxe_optional=True)
        finally:
            pool.shutdown()
        assert res.ok and res.power == "on", res
        assert "one-time PXE boot refused" in res.message, res.message
        assert sim.power() == "on" and ("power", "1") in [c[1:] for c in sim.commands()]
    finally:
        sim.stop()
