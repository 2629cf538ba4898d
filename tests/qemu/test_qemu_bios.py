"""BIOS: QEMU's iPXE ROM boots a node from bootherd to ISUP (virtio-net and e1000).

Chain: iPXE DHCP (user class iPXE) -> script URL -> GET /ipxe -> kernel and
initrd over HTTP /files -> node DHCP, TMCD fullconfig, state TBSETUP, tarball
with SHA-256 check, log upload, state ISUP, power-off.
"""

from __future__ import annotations

import pytest
from bootcheck import BIOS_NODES, check_booted

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]


@pytest.mark.parametrize("nic", ["virtio", "e1000"])
def test_qemu_bios_ipxe_boots_to_isup(lab, nic: str) -> None:
    lab.need("dhcp", "http", "tmcd")
    vm = lab.lab.boot(BIOS_NODES[nic], firmware="bios", nic=nic)
    states = check_booted(lab.lab, vm)
    assert states[0] == "PXEBOOTING", states
    out = vm.output()
    assert "iPXE" in out, "the serial log shows no iPXE: not booted by the ROM"
