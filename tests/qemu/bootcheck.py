"""Shared checks of the QEMU boot tests: node roles, waiting, and what a good boot shows."""

from __future__ import annotations

import time

import pytest
import vmenv

# Node roles in the session's inventory (see vmenv.node_specs).
BIOS_NODES = {"virtio": "qemu1", "e1000": "qemu2"}
UEFI_NODE = "qemu3"
WAIT_NODE = "qemu4"  # not allocated: waits in iPXE until the test allocates it
MANY_NODES = ["qemu5", "qemu6", "qemu7", "qemu8"]
BMC_NODE = "qemu9"  # powered over IPMI by ipmi_sim; boots to ISUP and stays up
SB_NODE = "qemu10"  # node type qemu-sb: shim as its UEFI loader
ARM64_NODE = "qemu11"  # arm64 VM (its OS image is the arm64 kernel)
ARM64_X86_NODE = "qemu12"  # the x86 VM booting beside it (same node type)
HTTP_NODE = "qemu13"  # OVMF's UEFI HTTP boot, bootherd's defaults
RELOAD_NODE = "qemu14"  # reloaded with a disk image, then boots that disk
RELOAD_MANY = ["qemu15", "qemu16", "qemu17", "qemu18"]  # reloaded at once, one session
NODE_COUNT = 18
NODE_TYPES = {SB_NODE: "qemu-sb"}
NODE_OSES = {ARM64_NODE: vmenv.OS_IMAGE_ARM64, RELOAD_NODE: vmenv.OS_DISK,
             BMC_NODE: vmenv.OS_IMAGE_UP, **{n: vmenv.OS_DISK for n in RELOAD_MANY}}
BOOT_TIMEOUT = 150.0  # TCG on two shared cores; a normal boot takes 10-30 s


def wait_for_state(lab: vmenv.Lab, node_id: str, state: str, timeout: float = 10.0
                   ) -> list[dict]:
    """The node's events once `state` is among them (events reach the DB in batches)."""
    from bootherd.inventory.db import make_engine
    from bootherd.inventory.ops import node_events

    engine = make_engine(lab.db_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            events = node_events(engine, node_id, 200)
            if any(e["state"] == state for e in events) or time.monotonic() > deadline:
                return events
            time.sleep(0.2)
    finally:
        engine.dispose()


def in_order(states: list[str], wanted: list[str]) -> bool:
    """wanted is a subsequence of states."""
    it = iter(states)
    return all(any(s == w for s in it) for w in wanted)


def boot_report(lab: vmenv.Lab, vm: vmenv.VM) -> str:
    return (f"--- {vm.name} timeline: {vm.timeline()}\n"
            f"--- {vm.name} serial (last lines) ---\n{vm.tail(50)}\n"
            f"--- bootherd serve (last lines) ---\n{lab.server_tail(40)}")


def check_booted(lab: vmenv.Lab, vm: vmenv.VM, timeout: float = BOOT_TIMEOUT,
                 via: list[str] | None = None) -> list[str]:
    """Wait for vm to power off; assert marker, ISUP history and uploaded log.

    Returns the node's state history."""
    from bootherd import config as configmod
    from bootherd.web.logs import read_log

    vm.wait(timeout)
    if not vm.done():
        lab.stop_vm(vm)
        pytest.fail(f"{vm.name} did not finish within {timeout:.0f} s\n" + boot_report(lab, vm))
    assert vm.failed is None, f"{vm.name}: {vm.failed}\n" + boot_report(lab, vm)
    assert vm.booted, f"{vm.name} powered off without the ISUP marker\n" + boot_report(lab, vm)
    nid = vm.node.node_id
    events = wait_for_state(lab, nid, "ISUP")
    states = [e["state"] for e in events]
    want = via or ["PXEBOOTING", "BOOTING", "TBSETUP", "ISUP"]
    assert in_order(states, want), f"{nid} states {states}, expected {want} in order"
    assert states[-1] == "ISUP", f"{nid} states {states} do not end in ISUP"
    cfg = configmod.load(lab.config)
    text = read_log(cfg, nid)
    assert "sha256 ok for tarballs/hello.tar.gz" in text, f"{nid} log:\n{text}"
    assert "hello from bootherd" in text
    print(f"{vm.name}: {vm.timeline()}")
    return states
