"""Which firmware a client boots with, and which loader slot that gives it.

The DHCP codec classifies a request (options 60, 77, 93 and 175) as a `Firmware`;
everything after it (the DHCP engine's reply options, the boot policy's choice of
loader, the inventory's `loader_<slot>` columns and `Node.loaders`) speaks of the
loader slot that firmware takes.  The tables here are the only mapping from one
to the other: serving another RFC 4578 architecture is a row in `PXE_ARCH` or
`HTTP_ARCH`, and the slot its `Firmware` takes in `LOADER_SLOT`.

No imports from the rest of bootherd: codecs and policy both import this.
"""

from __future__ import annotations

from enum import Enum, IntEnum


class ClientArch(IntEnum):
    """Option 93 values (RFC 4578 and the IANA processor architecture registry)."""

    X86_BIOS = 0
    NEC_PC98 = 1
    EFI_ITANIUM = 2
    DEC_ALPHA = 3
    ARC_X86 = 4
    INTEL_LEAN = 5
    EFI_IA32 = 6
    EFI_BC = 7  # EFI byte code; used by most x64 UEFI firmware (e.g. OVMF)
    EFI_XSCALE = 8
    EFI_X86_64 = 9
    EFI_ARM32 = 10
    EFI_ARM64 = 11
    EFI_X86_HTTP = 15
    EFI_X86_64_HTTP = 16
    EFI_ARM32_HTTP = 18
    EFI_ARM64_HTTP = 19


class Firmware(Enum):
    """What the DHCP classifier makes of a client."""

    BIOS_PXE = "bios-pxe"
    UEFI_X64 = "uefi-x64"
    UEFI_ARM64 = "uefi-arm64"
    UEFI_HTTP = "uefi-http-x64"
    UEFI_HTTP_ARM64 = "uefi-http-arm64"
    IPXE = "ipxe"
    OTHER = "other"  # no PXE (an OS's DHCP client), or an architecture we do not serve


# The architecture a "PXEClient" / "HTTPClient" vendor class names (option 93, or
# "Arch:xxxxx" inside option 60).  An architecture missing here classifies as OTHER.
PXE_ARCH: dict[int, Firmware] = {
    ClientArch.X86_BIOS: Firmware.BIOS_PXE,
    ClientArch.EFI_BC: Firmware.UEFI_X64,
    ClientArch.EFI_X86_64: Firmware.UEFI_X64,
    ClientArch.EFI_ARM64: Firmware.UEFI_ARM64,
}
HTTP_ARCH: dict[int, Firmware] = {
    ClientArch.EFI_X86_64_HTTP: Firmware.UEFI_HTTP,
    ClientArch.EFI_ARM64_HTTP: Firmware.UEFI_HTTP_ARM64,
}
HTTP_BOOT = frozenset(HTTP_ARCH.values())  # fetch their loader by URL, not TFTP

# Loader slots: the inventory's loader_<slot> columns, keys of Node.loaders.
BIOS, UEFI, HTTP, IPXE = "bios", "uefi", "http", "ipxe"
LOADER_SLOTS = (BIOS, UEFI, HTTP, IPXE)

LOADER_SLOT: dict[Firmware, str] = {
    Firmware.BIOS_PXE: BIOS,
    Firmware.UEFI_X64: UEFI,
    Firmware.UEFI_ARM64: UEFI,
    Firmware.UEFI_HTTP: HTTP,
    Firmware.UEFI_HTTP_ARM64: HTTP,
    Firmware.IPXE: IPXE,
    Firmware.OTHER: BIOS,  # answered with the BIOS boot file, without PXE options
}

_SLOT_BY_NAME = {**{f.value: slot for f, slot in LOADER_SLOT.items()},
                 **{slot: slot for slot in LOADER_SLOTS}}


def loader_slot(firmware: Firmware | str) -> str:
    """The loader slot of a Firmware, of its name ("uefi-x64") or of a slot name ("uefi").

    Anything unrecognised takes the BIOS slot, the most common old ROM's."""
    if isinstance(firmware, Firmware):
        return LOADER_SLOT[firmware]
    return _SLOT_BY_NAME.get(str(firmware).lower(), BIOS)
