"""Secure Boot enforced: OVMF's Secure Boot build with the Microsoft keys enrolled
PXE-boots the chain the distributions sign, shim -> GRUB -> the signed Debian kernel,
to ISUP; the same VM (its variable store) then refuses an unsigned loader.

bootherd hands the node (type qemu-sb: loader_uefi = shimx64.efi) Debian's shim,
signed by the UEFI CA; shim asks for grubx64.efi in its own folder (512-byte TFTP
blocks) and gets Debian's signed GRUB network image (tftp.system_loaders); GRUB
reads grub/grub.cfg and then grub/grub.cfg-<mac>, both generated from the boot
decision; GRUB's linux command has shim verify the kernel.
"""

from __future__ import annotations

import subprocess
import time

import pytest
import vmenv
from bootcheck import SB_NODE, boot_report, check_booted

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]


def test_qemu_secure_boot_shim_grub_signed_kernel_then_refuses_unsigned(lab) -> None:
    lab.need("dhcp", "tftp", "http", "tmcd")
    vm = lab.lab.boot(SB_NODE, firmware="uefi-sb")
    check_booted(lab.lab, vm)
    out = vm.output()
    # The kernel itself saw Secure Boot on; shim and GRUB came from bootherd over TFTP.
    assert "Secure boot enabled" in out, vm.tail(120)
    log = lab.lab.server_log.read_text(errors="replace")
    for name in ("shimx64.efi", "grubx64.efi", "grub/grub.cfg", f"grub/grub.cfg-{vm.node.mac}"):
        assert name in log, f"{name} never requested\n" + lab.lab.server_tail(80)
    assert f"bootherd: {SB_NODE}: booting QEMU-NODE" in out, vm.tail(80)

    # The same VM, told to load iPXE's unsigned snponly.efi: the firmware refuses it.
    r = subprocess.run([*vmenv.bootherd_cmd(), "node", "set", SB_NODE, "loader_uefi=snponly.efi",
                        "--db", lab.lab.db_url], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    time.sleep(1.0)  # the server's snapshot follows the inventory within a second
    again = lab.lab.boot(SB_NODE, firmware="uefi-sb", vars_file=vm.vars_file, tap=vm.tap)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and "Access Denied" not in again.output() \
            and not again.done():
        time.sleep(0.5)
    lab.lab.stop_vm(again)
    text = again.output()
    assert "NBP file downloaded successfully" in text or "snponly.efi" in text, \
        boot_report(lab.lab, again)
    assert "Access Denied" in text, boot_report(lab.lab, again)
    assert "iPXE" not in text and vmenv.MARKER_OK not in text
