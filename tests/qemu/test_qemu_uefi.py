"""UEFI: OVMF's own PXE (option ROM disabled) -> snponly.efi over TFTP -> iPXE ->
the same HTTP script, kernel and node image -> ISUP.

OVMF's TFTP first probes the size (tsize=0 blksize=1468 windowsize=4), aborts
with ERROR 8 after the OACK, then asks again: the server must serve the retry.
"""

from __future__ import annotations

import pytest
from bootcheck import UEFI_NODE, check_booted

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]


def test_qemu_uefi_pxe_tftp_ipxe_boots_to_isup(lab) -> None:
    lab.need("dhcp", "tftp", "http", "tmcd")
    before = lab.lab.gauges()
    vm = lab.lab.boot(UEFI_NODE, firmware="uefi", nic="virtio")
    check_booted(lab.lab, vm)
    after = lab.lab.gauges()
    out = vm.output()
    # OVMF's own PXE fetched the loader (no iPXE ROM), and the loader was iPXE.
    assert ">>Start PXE over IPv4" in out and "NBP file downloaded successfully" in out, \
        vm.tail(80)
    assert "iPXE" in out

    def grew(name: str) -> float:
        key = f"bootherd_tftp_{name}_total"
        if key not in after:
            return -1.0
        return after[key] - before.get(key, 0.0)

    # The size probe was aborted by the firmware and counted as such, not as a failure,
    # and the retry that followed delivered the loader.
    assert grew("probes_aborted") >= 1, {k: v for k, v in after.items() if "tftp" in k}
    assert grew("transfers_ok") >= 1, {k: v for k, v in after.items() if "tftp" in k}
    assert grew("transfers_failed") == 0, {k: v for k, v in after.items() if "tftp" in k}
