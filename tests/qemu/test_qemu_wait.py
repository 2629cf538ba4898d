"""WAIT: an unallocated node waits in iPXE's script loop; allocating it through
the CLI makes it boot to ISUP on its next poll, without a restart."""

from __future__ import annotations

import subprocess
import time

import pytest
import vmenv
from bootcheck import BOOT_TIMEOUT, WAIT_NODE, boot_report, check_booted, wait_for_state

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]

WAIT_TEXT = f"{WAIT_NODE} waits"  # what the iPXE wait script echoes on every poll


def test_qemu_unallocated_node_waits_then_boots_when_allocated(lab) -> None:
    lab.need("dhcp", "http", "tmcd")
    vm = lab.lab.boot(WAIT_NODE, firmware="bios", nic="virtio")
    pid = vm.proc.pid
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline and WAIT_TEXT not in vm.output():
        if vm.done():
            pytest.fail(f"{vm.name} stopped before waiting\n" + boot_report(lab.lab, vm))
        time.sleep(0.5)
    assert WAIT_TEXT in vm.output(), f"{vm.name} never reached the wait loop\n" \
        + boot_report(lab.lab, vm)
    events = wait_for_state(lab.lab, WAIT_NODE, "PXEWAIT")
    assert "PXEWAIT" in [e["state"] for e in events], events
    # The loop polls /ipxe again and is still told to wait.
    while time.monotonic() < deadline and vm.output().count(WAIT_TEXT) < 2:
        time.sleep(0.5)
    assert vm.output().count(WAIT_TEXT) >= 2, boot_report(lab.lab, vm)
    assert not vm.done(), "the waiting VM powered off\n" + boot_report(lab.lab, vm)

    r = subprocess.run([*vmenv.bootherd_cmd(), "experiment", "allocate", vmenv.PID, vmenv.EID,
                        f"{WAIT_NODE}:n4", "--db", lab.lab.db_url],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    check_booted(lab.lab, vm, via=["PXEBOOTING", "PXEWAIT", "BOOTING", "TBSETUP", "ISUP"])
    # Same QEMU process, and with -no-reboot a reset would have ended it: one
    # firmware start, the kernel loaded by the waiting iPXE itself.
    assert vm.proc.pid == pid
    out = vm.output()
    assert out.count("SeaBIOS (version") == 1, vm.tail(80)
    assert out.rindex(WAIT_TEXT) < out.index("/files/node/vmlinuz")
