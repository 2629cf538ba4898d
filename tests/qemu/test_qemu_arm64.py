"""arm64 beside x86: an arm64 VM (qemu-system-aarch64 -M virt -cpu max, TCG, AAVMF)
and an x86 VM (OVMF) of the same node type PXE-boot from bootherd at once; each gets
its own architecture's files.

The node type names the arm64 slot only (loaders.uefi-arm64 = Debian's signed arm64
GRUB network image, fetched with multiarch and unpacked by the lab); x86 keeps
bootherd's default (snponly.efi, then iPXE).  The arm64 GRUB reads the same generated
grub/grub.cfg and its node's grub/grub.cfg-<mac>, which boots the node's OS image: the
arm64 Debian kernel with an arm64 busybox initramfs.
"""

from __future__ import annotations

import re

import pytest
import vmenv
from bootcheck import ARM64_NODE, ARM64_X86_NODE, check_booted

pytestmark = [pytest.mark.qemu, pytest.mark.netns, pytest.mark.slow]

ARM64_BOOT_TIMEOUT = 300.0  # an emulated arm64 CPU on two shared cores


def _reads(log: str, ip: str) -> list[str]:
    """The files the TFTP server sent to `ip` (its debug transfer lines)."""
    return re.findall(rf"tftp: {re.escape(ip)} read (\S+): ok", log)


def test_qemu_arm64_and_x86_each_get_their_own_architectures_files(lab) -> None:
    lab.need("dhcp", "tftp", "http", "tmcd")
    arm = lab.lab.boot(ARM64_NODE, firmware="arm64")
    x86 = lab.lab.boot(ARM64_X86_NODE, firmware="uefi")
    check_booted(lab.lab, x86)
    check_booted(lab.lab, arm, timeout=ARM64_BOOT_TIMEOUT)
    log = lab.lab.server_log.read_text(errors="replace")
    arm_files = _reads(log, arm.node.ip)
    x86_files = _reads(log, x86.node.ip)
    assert arm_files[:1] == [vmenv.ARM64_LOADER], arm_files
    assert f"grub/grub.cfg-{arm.node.mac}" in arm_files
    assert "node/arm64/vmlinuz" in arm_files and "node/vmlinuz" not in arm_files, arm_files
    assert x86_files[:1] == ["snponly.efi"], x86_files
    assert not any("arm64" in f for f in x86_files), x86_files
    # Each booted its own architecture's kernel (the node's /init prints `uname -r`).
    assert re.search(r"node: kernel \S+-arm64,", arm.output()), arm.tail(60)
    assert re.search(r"node: kernel \S+-amd64,", x86.output()), x86.tail(60)
    assert "iPXE" in x86.output() and "iPXE" not in arm.output()
