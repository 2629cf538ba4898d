"""A real BMC: OpenIPMI's ipmi_sim drives a QEMU VM through QEMU's external BMC
device.  `bootherd node power` (through the running server, over IPMI LAN from
the server's namespace) reads its status and powers the VM on, cycles it and
powers it off; the VM PXE-boots from bootherd after each power-on; and its
serial console reaches the node's console log over serial-over-LAN."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import vmenv
from bootcheck import BMC_NODE, BOOT_TIMEOUT, wait_for_state

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]

WAITS = f"{BMC_NODE} waits"  # the iPXE wait loop's line: the VM is up and polling


def power(lab: vmenv.Lab, op: str) -> dict:
    """`bootherd node power OP` run in the server's namespace, as an operator there would."""
    r = subprocess.run(["ip", "netns", "exec", lab.ns_server, *vmenv.bootherd_cmd(), "node",
                        "power", op, BMC_NODE, "--json", "--config", str(lab.config)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"power {op}: {r.stdout}{r.stderr}"
    (res,) = json.loads(r.stdout)["results"]
    assert res["ok"], res
    return res


def console(lab: vmenv.Lab) -> str:
    r = subprocess.run([*vmenv.bootherd_cmd(), "node", "logs", BMC_NODE, "console", "--config",
                        str(lab.config)], capture_output=True, text=True, timeout=60)
    return r.stdout if r.returncode == 0 else ""


def wait_for(what: str, pred, timeout: float = BOOT_TIMEOUT) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.5)


def test_qemu_ipmi_power_moves_the_vm_and_its_console_arrives_over_sol(lab) -> None:
    lab.need("dhcp", "http", "console")
    bmc = lab.lab.start_bmc(BMC_NODE)
    assert bmc.vm_pids() == []
    assert power(lab.lab, "status")["power"] == "off"

    res = power(lab.lab, "on")
    assert res["driver"] == "ipmi" and "power on accepted" in res["message"]
    wait_for("a QEMU process for the VM", lambda: len(bmc.vm_pids()) == 1, 30)
    first = bmc.vm_pids()[0]
    assert power(lab.lab, "status")["power"] == "on"
    # The VM PXE-boots from bootherd and waits, polling: its serial line reaches
    # the console log through ipmi_sim's serial-over-LAN and bootherd's capture.
    wait_for(f"{WAITS!r} in the console log", lambda: WAITS in console(lab.lab))
    log = console(lab.lab)
    assert "SeaBIOS" in log and "iPXE" in log, log[-2000:]
    events = wait_for_state(lab.lab, BMC_NODE, "PXEWAIT")
    states = [e["state"] for e in events]
    assert "POWER_ON" in states and states.index("POWER_ON") < states.index("PXEWAIT"), states

    res = power(lab.lab, "cycle")
    assert "power cycle accepted" in res["message"]
    wait_for("the VM powered off and on again (a new QEMU process)",
             lambda: bmc.vm_pids() not in ([], [first]), 60)
    wait_for("a second firmware start in the console log",
             lambda: console(lab.lab).count("SeaBIOS (version") >= 2)
    wait_for("the VM waiting again", lambda: console(lab.lab).count(WAITS)
             > log.count(WAITS) and console(lab.lab).rindex(WAITS)
             > console(lab.lab).rindex("SeaBIOS (version"))

    power(lab.lab, "off")
    wait_for("the VM gone", lambda: bmc.vm_pids() == [], 60)
    assert power(lab.lab, "status")["power"] == "off"
    events = wait_for_state(lab.lab, BMC_NODE, "POWER_OFF")
    power_events = [(e["state"], e["source"]) for e in events if e["state"].startswith("POWER")]
    assert power_events == [("POWER_ON", "cli"), ("POWER_CYCLE", "cli"), ("POWER_OFF", "cli")]
    assert vmenv.BMC_PASSWORD not in json.dumps(events)
