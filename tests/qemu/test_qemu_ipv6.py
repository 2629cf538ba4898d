"""IPv6-only: OVMF boots to ISUP over PXE on IPv6 (DHCPv6 + TFTP over IPv6) and over
UEFI HTTP boot on IPv6, both at once, on a link with no IPv4 address at all.

radvd announces the /64 with the managed flag; bootherd's DHCPv6 server gives each
firmware its inventory address (interfaces.ip6) and the boot file URL (option 59):
tftp://[fd77::1]/snponly.efi for PXE, http://[fd77::1]:80/boot/ipxe.efi (with vendor
class HTTPClient) for HTTP boot.  iPXE then asks DHCPv6 again and gets its script URL;
the booted node forms the same address from the router advertisement and talks TMCD
and HTTP over IPv6.
"""

from __future__ import annotations

import pytest
from bootcheck import check_booted

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]


def test_qemu_ipv6_only_pxe6_and_http6_boot_to_isup(lab6) -> None:
    lab6.need("dhcp6", "tftp", "http", "tmcd")
    pxe_node, http_node = sorted(lab6.lab.nodes)
    pxe = lab6.lab.boot(pxe_node, firmware="uefi-pxe6")
    http = lab6.lab.boot(http_node, firmware="uefi-http6")
    # Two emulated VMs at once, and iPXE 1.0 waits for router advertisements before its
    # DHCPv6: on a loaded 2-core machine that alone took 70 s, so a longer deadline.
    for vm in (pxe, http):
        check_booted(lab6.lab, vm, timeout=300.0)
    p, h = pxe.output(), http.output()
    assert ">>Start PXE over IPv6" in p and ">>Start PXE over IPv4" not in p, pxe.tail(80)
    assert ">>Start HTTP Boot over IPv6" in h and "PXE over" not in h, http.tail(80)
    assert "http://[fd77::1]:80/boot/ipxe.efi" in h
    for vm in (pxe, http):
        out = vm.output()
        assert f"node: control address {vm.node.ip6}, boot server fd77::1" in out, vm.tail(60)
    log = lab6.lab.server_log.read_text(errors="replace")
    assert "dhcp6 listening" in log and "dhcp listening" not in log
