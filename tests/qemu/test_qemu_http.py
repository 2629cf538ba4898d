"""UEFI HTTP boot: OVMF's HTTP boot client (HTTPClient, its PXE switched off) boots a
node to ISUP with bootherd's defaults: no loader named in the inventory, nothing in the
TFTP root; the default HTTP loader URL (/boot/ipxe.efi) is answered from Debian's ipxe
package (tftp.system_loaders), then iPXE takes the usual script and files."""

from __future__ import annotations

import pytest
from bootcheck import HTTP_NODE, check_booted

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]


def test_qemu_uefi_http_boot_with_bootherds_defaults(lab) -> None:
    lab.need("dhcp", "http", "tmcd")
    node = lab.lab.nodes[HTTP_NODE]
    assert node.type == "qemu" and not (lab.lab.dir / "tftpboot/ipxe.efi").exists()
    vm = lab.lab.boot(HTTP_NODE, firmware="uefi-http")
    check_booted(lab.lab, vm)
    out = vm.output()
    assert ">>Start HTTP Boot over IPv4" in out, vm.tail(80)
    assert ">>Start PXE" not in out, "booted over PXE, not HTTP"
    assert "/boot/ipxe.efi" in out and "iPXE" in out, vm.tail(80)
