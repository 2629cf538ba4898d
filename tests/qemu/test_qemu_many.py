"""Four VMs power on at once and all boot to ISUP."""

from __future__ import annotations

import pytest
from bootcheck import MANY_NODES, check_booted

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]


def test_qemu_four_vms_at_once_boot_to_isup(lab) -> None:
    lab.need("dhcp", "http", "tmcd")
    vms = [lab.lab.boot(n, firmware="bios", nic="virtio") for n in MANY_NODES]
    for vm in vms:
        check_booted(lab.lab, vm)
