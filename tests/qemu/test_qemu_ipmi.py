"""A real BMC: OpenIPMI's ipmi_sim drives a QEMU VM through QEMU's external BMC
device.  `bootherd node power` (through the running server, over IPMI LAN from
the server's namespace) reads its status and powers the VM on, cycles it and
powers it off; the VM PXE-boots from bootherd to ISUP after each power-on; and
its serial console reaches the node's console log over serial-over-LAN.  A
kernel that hangs on purpose is found by the watcher and power-cycled by the
recovery ladder over the same IPMI LAN; the next boot reaches ISUP."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import vmenv
from bootcheck import BMC_NODE, BOOT_TIMEOUT, in_order, wait_for_state

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]

# states.booting_timeout while the hung kernel's test runs: longer than a good boot's
# BOOTING and TBSETUP on loaded TCG (10-30 s each), shorter than the lab's default.
HUNG_AFTER = 60


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


def events_after(lab: vmenv.Lab, first_id: int, state: str, timeout: float = 10.0) -> list[dict]:
    """The node's events with ids above first_id (this test's), once `state` is among them."""
    deadline = time.monotonic() + timeout
    while True:
        new = [e for e in wait_for_state(lab, BMC_NODE, state, 0) if e["id"] > first_id]
        if any(e["state"] == state for e in new) or time.monotonic() > deadline:
            return new
        time.sleep(0.5)


def last_event_id(lab: vmenv.Lab) -> int:
    return max((e["id"] for e in wait_for_state(lab, BMC_NODE, "", 0)), default=0)


def powered_off(lab: vmenv.Lab, bmc: vmenv.Bmc) -> None:
    """Start from a VM that is off (a failed test before may have left it on)."""
    if power(lab, "status")["power"] != "off":
        power(lab, "off")
    wait_for("the VM gone", lambda: bmc.vm_pids() == [], 60)


def test_qemu_ipmi_power_moves_the_vm_and_its_console_arrives_over_sol(lab) -> None:
    lab.need("dhcp", "http", "tmcd", "console")
    bmc = lab.lab.start_bmc(BMC_NODE)
    powered_off(lab.lab, bmc)
    since, base = last_event_id(lab.lab), len(console(lab.lab))

    def log() -> str:  # what the console showed since this test began
        return console(lab.lab)[base:]

    assert power(lab.lab, "status")["power"] == "off"
    res = power(lab.lab, "on")
    assert res["driver"] == "ipmi" and "power on accepted" in res["message"]
    wait_for("a QEMU process for the VM", lambda: len(bmc.vm_pids()) == 1, 30)
    first = bmc.vm_pids()[0]
    assert power(lab.lab, "status")["power"] == "on"
    # The VM PXE-boots from bootherd to ISUP and stays up: its serial line reaches
    # the console log through ipmi_sim's serial-over-LAN and bootherd's capture.
    wait_for("ISUP in the console log", lambda: vmenv.MARKER_OK in log())
    text = log()
    assert "SeaBIOS" in text and "iPXE" in text and "Linux version" in text, text[-2000:]
    states = [e["state"] for e in events_after(lab.lab, since, "ISUP")]
    assert in_order(states, ["POWER_ON", "BOOTING", "TBSETUP", "ISUP"]), states

    res = power(lab.lab, "cycle")
    assert "power cycle accepted" in res["message"]
    wait_for("the VM powered off and on again (a new QEMU process)",
             lambda: bmc.vm_pids() not in ([], [first]), 60)
    wait_for("a second firmware start in the console log",
             lambda: log().count("SeaBIOS (version") >= 2)
    wait_for("ISUP again after it", lambda: log().rfind(vmenv.MARKER_OK)
             > log().rindex("SeaBIOS (version"))

    power(lab.lab, "off")
    wait_for("the VM gone", lambda: bmc.vm_pids() == [], 60)
    assert power(lab.lab, "status")["power"] == "off"
    events = events_after(lab.lab, since, "POWER_OFF")
    power_events = [(e["state"], e["source"]) for e in events
                    if e["state"] in ("POWER_ON", "POWER_CYCLE", "POWER_OFF")]
    assert power_events == [("POWER_ON", "cli"), ("POWER_CYCLE", "cli"), ("POWER_OFF", "cli")]
    assert vmenv.BMC_PASSWORD not in json.dumps(events)


def test_qemu_hung_kernel_is_found_power_cycled_over_ipmi_and_reaches_isup(lab) -> None:
    """The one-time next_os boots a kernel that panics and hangs (panic=0); the watcher
    finds the node in BOOTING past states.booting_timeout, the ladder power-cycles it
    through ipmi_sim, and the second boot (the one-time order used up) reaches ISUP.
    Both boots' kernel output is in the console log, which came over SOL."""
    lab.need("dhcp", "http", "tmcd", "console")
    L = lab.lab
    bmc = L.start_bmc(BMC_NODE)
    powered_off(L, bmc)
    since, base = last_event_id(L), len(console(L))

    def log() -> str:
        return console(L)[base:]

    r = subprocess.run([*vmenv.bootherd_cmd(), "node", "set", BMC_NODE,
                        f"next_os={vmenv.OS_HANG}", "--config", str(L.config)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    def states() -> list[str]:
        """This test's states so far; fails at once when the ladder gave up."""
        seen = [e["state"] for e in events_after(L, since, "", 0)]
        assert not [s for s in seen if s.endswith("FAILED")], \
            f"the ladder gave up: {seen}\n{L.server_tail(30)}"
        return seen

    with L.server_settings({"states.booting_timeout": HUNG_AFTER}):
        try:
            power(L, "on")
            wait_for("a QEMU process for the VM", lambda: len(bmc.vm_pids()) == 1, 30)
            first = bmc.vm_pids()[0]
            wait_for("the kernel's panic in the console log", lambda: vmenv.HANG_TEXT in log())
            assert bmc.vm_pids() == [first], "the hung kernel did not stay hung"
            wait_for("the ladder's power cycle: a new QEMU process", lambda: bool(states())
                     and bmc.vm_pids() not in ([], [first]), HUNG_AFTER + BOOT_TIMEOUT)
            wait_for("ISUP after the power cycle", lambda: "ISUP" in states())
            wait_for("ISUP in the console log", lambda: vmenv.MARKER_OK in log(), 30)
        finally:
            powered_off(L, bmc)

    events = events_after(L, since, "ISUP")
    steps = [(e["state"], e["source"]) for e in events]
    cycle = steps.index(("POWER_CYCLE", "ladder"))
    assert in_order(steps[:cycle], [("POWER_ON", "cli"), ("BOOTING", "ipxe"),
                                    ("REBOOTING", "ladder")]), steps
    assert in_order(steps[cycle:], [("POWER_CYCLE", "ladder"), ("PXEBOOTING", "dhcp"),
                                    ("BOOTING", "ipxe"), ("TBSETUP", "tmcd"),
                                    ("ISUP", "tmcd")]), steps
    assert [s for s, _ in steps].count("POWER_CYCLE") == 1, steps  # the good boot: not cycled
    assert "ISUP" not in [s for s, _ in steps[:cycle]], steps
    (rebooting,) = [e["detail"] for e in events if e["state"] == "REBOOTING"]
    m = re.fullmatch(r"power cycle 1 of \d+: in BOOTING for (\d+) s", rebooting)
    assert m and int(m.group(1)) >= HUNG_AFTER, rebooting
    boots = [e["detail"] for e in events if e["state"] == "BOOTING"]
    assert vmenv.OS_HANG in boots[0] and vmenv.OS_IMAGE_UP in boots[-1], boots

    # Over SOL: the hung kernel's command line and panic, the power cycle's second
    # firmware start, the good kernel and its ISUP.
    text = log()
    panic = text.index(vmenv.HANG_TEXT)
    assert text.index("rdinit=/no-such-init") < panic, text[:3000]
    second = text.index("SeaBIOS (version", panic)
    assert text.index("Linux version", second) < text.index(vmenv.MARKER_OK, second)
    assert text.count("Linux version") == 2, text[-3000:]

    from bootherd.inventory.db import make_engine
    from bootherd.inventory.ops import show_node

    engine = make_engine(L.db_url)
    try:
        assert show_node(engine, BMC_NODE)["next_os"] is None  # the one-time order was used
    finally:
        engine.dispose()
    for where, what in (("events", json.dumps(events)), ("console log", text),
                        ("server log", L.server_log.read_text(errors="replace"))):
        assert vmenv.BMC_PASSWORD not in what, f"the BMC password is in the {where}"
