"""Redfish against sushy-tools' emulator (fake systems driver, basic auth): status,
on, off, cycle, one-time PXE; wrong credentials, refused, silent and babbling BMCs."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from bmc_helpers import PASSWORD, SYSTEM_UUIDS, USER, Misbehaving, SushyEmulator, closed_port, start_sushy

from bootherd.power.controller import PowerController, PowerSettings
from bootherd.power.core import BmcTarget, PowerOp
from bootherd.power.drivers import make_drivers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    e = start_sushy(tmp_path_factory.mktemp("sushy"))
    yield e
    e.stop()


def controller(targets: dict[str, BmcTarget], events: list, timeout: float = 8.0
               ) -> tuple[PowerController, ThreadPoolExecutor]:
    st = PowerSettings(timeout=timeout, max_concurrent=8, power_on_rate=0.0)
    pool = ThreadPoolExecutor(max_workers=8)

    async def load(ids: list[str]) -> dict[str, BmcTarget]:
        return {i: targets[i] for i in ids if i in targets}

    return PowerController(st, load, lambda *ev: events.append(ev), make_drivers(st, pool)), pool


async def wait_power(ctl: PowerController, node: str, want: str, within: float = 30.0) -> str:
    """The fake driver applies a power change 1-11 s later, as slow hardware does."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    seen = ""
    while loop.time() < end:
        (res,) = await ctl.run(PowerOp.STATUS, [node])
        assert res.ok, res
        seen = res.power
        if seen == want:
            return seen
        await asyncio.sleep(0.5)
    return seen


async def test_redfish_status_on_off_cycle_and_one_time_pxe(emulator: SushyEmulator) -> None:
    uuid = SYSTEM_UUIDS[0]
    node = BmcTarget("r1", "redfish", emulator.url, 0, USER, PASSWORD, uuid)
    events: list = []
    ctl, pool = controller({"r1": node}, events)
    try:
        assert await wait_power(ctl, "r1", "off") == "off"
        (res,) = await ctl.run(PowerOp.ON, ["r1"], pxe=True, source="test")
        assert res.ok, res
        # (The emulator keeps the target and always reports "Continuous": it ignores
        # BootSourceOverrideEnabled, as libvirt has no one-time boot device.)
        assert emulator.system(uuid)["Boot"]["BootSourceOverrideTarget"] == "Pxe"
        assert await wait_power(ctl, "r1", "on") == "on"
        (res,) = await ctl.run(PowerOp.CYCLE, ["r1"], source="test")
        assert res.ok and "ForceRestart" in res.message, res  # the emulator offers no PowerCycle
        assert await wait_power(ctl, "r1", "on") == "on"
        (res,) = await ctl.run(PowerOp.OFF, ["r1"], source="test")
        assert res.ok, res
        assert await wait_power(ctl, "r1", "off") == "off"
        (res,) = await ctl.run(PowerOp.CYCLE, ["r1"], source="test")
        assert res.ok and "was off" in res.message, res
        assert await wait_power(ctl, "r1", "on") == "on"
        (res,) = await ctl.run(PowerOp.SOFT, ["r1"], source="test")
        assert res.ok and "GracefulShutdown" in res.message, res
        assert await wait_power(ctl, "r1", "off") == "off"
    finally:
        pool.shutdown()
    assert [e[1] for e in events] == ["POWER_ON", "POWER_CYCLE", "POWER_OFF", "POWER_CYCLE",
                                      "POWER_SOFT"]
    assert all(PASSWORD not in e[4] for e in events)


async def test_redfish_bad_bmcs_give_clear_errors_in_time(emulator: SushyEmulator) -> None:
    bad = Misbehaving()
    timeout = 5.0
    try:
        html = bad.tcp(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 21\r\n"
                       b"Connection: close\r\n\r\n<html>printer!</html>")
        binary = bad.tcp(b"\x16\x03\x01\x00\xff" + bytes(range(256)))
        silent = bad.tcp(None)
        targets = {
            "good": BmcTarget("good", "redfish", emulator.url, 0, USER, PASSWORD, SYSTEM_UUIDS[1]),
            "badpw": BmcTarget("badpw", "redfish", emulator.url, 0, USER, "wrong-password",
                               SYSTEM_UUIDS[1]),
            "nosys": BmcTarget("nosys", "redfish", emulator.url, 0, USER, PASSWORD, "no-such-id"),
            "refused": BmcTarget("refused", "redfish", f"http://127.0.0.1:{closed_port()}", 0,
                                 USER, PASSWORD),
            "html": BmcTarget("html", "redfish", f"http://127.0.0.1:{html}", 0, USER, PASSWORD),
            "binary": BmcTarget("binary", "redfish", f"http://127.0.0.1:{binary}", 0, USER,
                                PASSWORD),
            "silent": BmcTarget("silent", "redfish", f"http://127.0.0.1:{silent}", 0, USER,
                                PASSWORD),
        }
        events: list = []
        ctl, pool = controller(targets, events, timeout)
        try:
            results = {r.node_id: r for r in await ctl.run(PowerOp.STATUS, list(targets))}
        finally:
            pool.shutdown(wait=False)
    finally:
        bad.close()
    assert results["good"].ok and results["good"].power in ("on", "off"), results["good"]
    want = {"badpw": ("auth",), "nosys": ("refused",), "refused": ("unreachable",),
            "html": ("protocol",), "binary": ("protocol",), "silent": ("timeout",)}
    for nid, kinds in want.items():
        r = results[nid]
        assert not r.ok and r.error in kinds, r
        assert r.elapsed <= timeout + 1.0, f"{nid} took {r.elapsed:.1f} s (timeout {timeout})"
        assert PASSWORD not in r.message and "wrong-password" not in r.message
    assert "refused the credentials of user 'admin'" in results["badpw"].message
    assert "not with" in results["html"].message and "Redfish" in results["html"].message
    assert events == [], "status queries are not history"
