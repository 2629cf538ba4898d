"""Which firmware a client boots with, and which loader slot that gives it.

Every client architecture type of RFC 4578 and the IANA "Processor Architecture
Types" registry (DHCPv4 option 93, DHCPv6 option 61) is a row of `ARCHITECTURES`:
its name, and the loader slot its firmware takes (`Firmware`, one member per slot).
Everything after the classifier (the DHCP engines' reply options, the boot policy's
choice of loader, the inventory's `loader_<slot>` columns and `loaders` maps, and
`Node.loaders`) speaks of that slot.  A slot no node type or node fills, and that
has no built-in default (`DEFAULT_LOADERS`), is refused: the client gets no offer
and the log says why, never another architecture's binary.

Types 7 and 9: RFC 4578 named 7 "EFI BC" and 9 "EFI x86-64"; its erratum 4624 and
the IANA registry swap them.  x64 firmware in the field sends either (OVMF sends 7),
so both take the x64 UEFI slot.

No imports from the rest of bootherd: codecs and policy both import this.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum


class ClientArch(IntEnum):
    """Client architecture types (IANA registry; RFC 4578, RFC 5970)."""

    X86_BIOS = 0
    NEC_PC98 = 1
    ITANIUM = 2
    DEC_ALPHA = 3
    ARC_X86 = 4
    INTEL_LEAN = 5
    EFI_IA32 = 6
    EFI_X64 = 7
    EFI_XSCALE = 8
    EFI_BC = 9
    EFI_ARM32 = 10
    EFI_ARM64 = 11
    PPC_OPEN_FIRMWARE = 12
    PPC_EPAPR = 13
    POWER_OPAL_V3 = 14
    EFI_X86_HTTP = 15
    EFI_X64_HTTP = 16
    EFI_BC_HTTP = 17
    EFI_ARM32_HTTP = 18
    EFI_ARM64_HTTP = 19
    X86_BIOS_HTTP = 20
    UBOOT_ARM32 = 21
    UBOOT_ARM64 = 22
    UBOOT_ARM32_HTTP = 23
    UBOOT_ARM64_HTTP = 24
    EFI_RISCV32 = 25
    EFI_RISCV32_HTTP = 26
    EFI_RISCV64 = 27
    EFI_RISCV64_HTTP = 28
    EFI_RISCV128 = 29
    EFI_RISCV128_HTTP = 30
    S390_BASIC = 31
    S390_EXTENDED = 32
    EFI_MIPS32 = 33
    EFI_MIPS64 = 34
    EFI_SUNWAY32 = 35
    EFI_SUNWAY64 = 36
    EFI_LOONGARCH32 = 37
    EFI_LOONGARCH32_HTTP = 38
    EFI_LOONGARCH64 = 39
    EFI_LOONGARCH64_HTTP = 40
    ARM_RPIBOOT = 41


class Firmware(Enum):
    """What the classifier makes of a client; the value is its loader slot."""

    BIOS_PXE = "bios"
    UEFI_X64 = "uefi"
    UEFI_IA32 = "uefi-ia32"
    UEFI_ARM32 = "uefi-arm32"
    UEFI_ARM64 = "uefi-arm64"
    UEFI_RISCV32 = "uefi-riscv32"
    UEFI_RISCV64 = "uefi-riscv64"
    UEFI_RISCV128 = "uefi-riscv128"
    UEFI_MIPS32 = "uefi-mips32"
    UEFI_MIPS64 = "uefi-mips64"
    UEFI_SUNWAY32 = "uefi-sunway32"
    UEFI_SUNWAY64 = "uefi-sunway64"
    UEFI_LOONGARCH32 = "uefi-loongarch32"
    UEFI_LOONGARCH64 = "uefi-loongarch64"
    UEFI_ITANIUM = "uefi-itanium"
    UEFI_XSCALE = "uefi-xscale"
    UEFI_HTTP = "http"
    UEFI_HTTP_IA32 = "http-ia32"
    UEFI_HTTP_ARM32 = "http-arm32"
    UEFI_HTTP_ARM64 = "http-arm64"
    UEFI_HTTP_RISCV32 = "http-riscv32"
    UEFI_HTTP_RISCV64 = "http-riscv64"
    UEFI_HTTP_RISCV128 = "http-riscv128"
    UEFI_HTTP_LOONGARCH32 = "http-loongarch32"
    UEFI_HTTP_LOONGARCH64 = "http-loongarch64"
    BIOS_HTTP = "http-bios"
    UBOOT_ARM32 = "uboot-arm32"
    UBOOT_ARM64 = "uboot-arm64"
    UBOOT_HTTP_ARM32 = "http-uboot-arm32"
    UBOOT_HTTP_ARM64 = "http-uboot-arm64"
    PC98 = "pc98"
    ALPHA = "alpha"
    ARC_X86 = "arc-x86"
    INTEL_LEAN = "intel-lean"
    PPC_OPEN_FIRMWARE = "ppc-ofw"
    PPC_EPAPR = "ppc-epapr"
    POWER_OPAL = "power-opal"
    S390_BASIC = "s390-basic"
    S390_EXTENDED = "s390-extended"
    RPIBOOT = "rpiboot"
    IPXE = "ipxe"  # iPXE itself (any architecture): gets the per-node script URL
    OTHER = "other"  # no PXE or HTTP boot vendor class: an operating system's DHCP client
    UNKNOWN = "unknown"  # a PXE/HTTP client naming an architecture the registry lacks

    @property
    def slot(self) -> str:
        return self.value

    @property
    def http(self) -> bool:
        """Fetches its loader by URL (UEFI HTTP boot), not over TFTP."""
        return self.value.startswith("http")


@dataclass(frozen=True, slots=True)
class Architecture:
    code: int
    name: str  # as the IANA registry names it
    firmware: Firmware


_A, _F = ClientArch, Firmware
ARCHITECTURES: dict[int, Architecture] = {a.code: a for a in (
    Architecture(_A.X86_BIOS, "x86 BIOS", _F.BIOS_PXE),
    Architecture(_A.NEC_PC98, "NEC/PC98 (deprecated)", _F.PC98),
    Architecture(_A.ITANIUM, "Itanium", _F.UEFI_ITANIUM),
    Architecture(_A.DEC_ALPHA, "DEC Alpha (deprecated)", _F.ALPHA),
    Architecture(_A.ARC_X86, "Arc x86 (deprecated)", _F.ARC_X86),
    Architecture(_A.INTEL_LEAN, "Intel Lean Client (deprecated)", _F.INTEL_LEAN),
    Architecture(_A.EFI_IA32, "x86 UEFI", _F.UEFI_IA32),
    Architecture(_A.EFI_X64, "x64 UEFI", _F.UEFI_X64),
    Architecture(_A.EFI_XSCALE, "EFI Xscale (deprecated)", _F.UEFI_XSCALE),
    Architecture(_A.EFI_BC, "EBC (x64 UEFI in RFC 4578)", _F.UEFI_X64),
    Architecture(_A.EFI_ARM32, "ARM 32-bit UEFI", _F.UEFI_ARM32),
    Architecture(_A.EFI_ARM64, "ARM 64-bit UEFI", _F.UEFI_ARM64),
    Architecture(_A.PPC_OPEN_FIRMWARE, "PowerPC Open Firmware", _F.PPC_OPEN_FIRMWARE),
    Architecture(_A.PPC_EPAPR, "PowerPC ePAPR", _F.PPC_EPAPR),
    Architecture(_A.POWER_OPAL_V3, "POWER OPAL v3", _F.POWER_OPAL),
    Architecture(_A.EFI_X86_HTTP, "x86 UEFI boot from HTTP", _F.UEFI_HTTP_IA32),
    Architecture(_A.EFI_X64_HTTP, "x64 UEFI boot from HTTP", _F.UEFI_HTTP),
    Architecture(_A.EFI_BC_HTTP, "EBC boot from HTTP", _F.UEFI_HTTP),
    Architecture(_A.EFI_ARM32_HTTP, "ARM 32-bit UEFI boot from HTTP", _F.UEFI_HTTP_ARM32),
    Architecture(_A.EFI_ARM64_HTTP, "ARM 64-bit UEFI boot from HTTP", _F.UEFI_HTTP_ARM64),
    Architecture(_A.X86_BIOS_HTTP, "PC/AT BIOS boot from HTTP", _F.BIOS_HTTP),
    Architecture(_A.UBOOT_ARM32, "ARM 32-bit U-Boot", _F.UBOOT_ARM32),
    Architecture(_A.UBOOT_ARM64, "ARM 64-bit U-Boot", _F.UBOOT_ARM64),
    Architecture(_A.UBOOT_ARM32_HTTP, "ARM 32-bit U-Boot boot from HTTP", _F.UBOOT_HTTP_ARM32),
    Architecture(_A.UBOOT_ARM64_HTTP, "ARM 64-bit U-Boot boot from HTTP", _F.UBOOT_HTTP_ARM64),
    Architecture(_A.EFI_RISCV32, "RISC-V 32-bit UEFI", _F.UEFI_RISCV32),
    Architecture(_A.EFI_RISCV32_HTTP, "RISC-V 32-bit UEFI boot from HTTP", _F.UEFI_HTTP_RISCV32),
    Architecture(_A.EFI_RISCV64, "RISC-V 64-bit UEFI", _F.UEFI_RISCV64),
    Architecture(_A.EFI_RISCV64_HTTP, "RISC-V 64-bit UEFI boot from HTTP", _F.UEFI_HTTP_RISCV64),
    Architecture(_A.EFI_RISCV128, "RISC-V 128-bit UEFI", _F.UEFI_RISCV128),
    Architecture(_A.EFI_RISCV128_HTTP, "RISC-V 128-bit UEFI boot from HTTP",
                 _F.UEFI_HTTP_RISCV128),
    Architecture(_A.S390_BASIC, "s390 Basic", _F.S390_BASIC),
    Architecture(_A.S390_EXTENDED, "s390 Extended", _F.S390_EXTENDED),
    Architecture(_A.EFI_MIPS32, "MIPS 32-bit UEFI", _F.UEFI_MIPS32),
    Architecture(_A.EFI_MIPS64, "MIPS 64-bit UEFI", _F.UEFI_MIPS64),
    Architecture(_A.EFI_SUNWAY32, "Sunway 32-bit UEFI", _F.UEFI_SUNWAY32),
    Architecture(_A.EFI_SUNWAY64, "Sunway 64-bit UEFI", _F.UEFI_SUNWAY64),
    Architecture(_A.EFI_LOONGARCH32, "LoongArch 32-bit UEFI", _F.UEFI_LOONGARCH32),
    Architecture(_A.EFI_LOONGARCH32_HTTP, "LoongArch 32-bit UEFI boot from HTTP",
                 _F.UEFI_HTTP_LOONGARCH32),
    Architecture(_A.EFI_LOONGARCH64, "LoongArch 64-bit UEFI", _F.UEFI_LOONGARCH64),
    Architecture(_A.EFI_LOONGARCH64_HTTP, "LoongArch 64-bit UEFI boot from HTTP",
                 _F.UEFI_HTTP_LOONGARCH64),
    Architecture(_A.ARM_RPIBOOT, "ARM rpiboot", _F.RPIBOOT),
)}
del _A, _F

HTTP_BOOT = frozenset(f for f in Firmware if f.http)  # fetch their loader by URL, not TFTP

# Loader slots: what the inventory's loader_<slot> columns and `loaders` maps are keyed
# by, and the keys of Node.loaders.  The first four have columns of their own (they
# predate the others); every other slot lives in the `loaders` maps.
BIOS, UEFI, HTTP, IPXE = "bios", "uefi", "http", "ipxe"
COLUMN_SLOTS = (BIOS, UEFI, HTTP, IPXE)
LOADER_SLOTS = tuple(f.slot for f in Firmware if f not in (Firmware.OTHER, Firmware.UNKNOWN))
MAP_SLOTS = frozenset(LOADER_SLOTS) - set(COLUMN_SLOTS)

# What a slot gets when neither the node nor its type names a loader: Debian's iPXE
# package ships these three x86 binaries.  Every other slot has no default: a client
# of that architecture is refused until the inventory names its loader.
DEFAULT_LOADERS = {BIOS: "undionly.kpxe", UEFI: "snponly.efi", HTTP: "ipxe.efi"}

# Old names of Firmware members (before every architecture had its own slot), still
# accepted where a slot is named in text.
_ALIASES = {"bios-pxe": BIOS, "pxe": BIOS, "uefi-x64": UEFI, "uefi-http-x64": HTTP,
            "uefi-http-arm64": "http-arm64", "other": BIOS}


def architecture(code: int) -> Architecture | None:
    return ARCHITECTURES.get(code)


def pxe_firmware(code: int | None, http: bool) -> Firmware:
    """The Firmware of a "PXEClient" (http False) or "HTTPClient" vendor class naming
    architecture `code` (None: not named, which pre-RFC 4578 BIOS ROMs do; an HTTP
    boot client always names it).

    An HTTPClient naming a PXE architecture (or the reverse) is taken at its word
    about the CPU, and given that architecture's slot for the way it asked."""
    if code is None:
        return Firmware.UNKNOWN if http else Firmware.BIOS_PXE
    arch = ARCHITECTURES.get(code)
    if arch is None:
        return Firmware.UNKNOWN
    fw = arch.firmware
    if fw.http == http:
        return fw
    return _COUNTERPART.get(fw, Firmware.UNKNOWN)


# The same CPU's slot over the other transport, where the registry has both.
_PAIRS = [(Firmware.BIOS_PXE, Firmware.BIOS_HTTP), (Firmware.UEFI_X64, Firmware.UEFI_HTTP),
          (Firmware.UEFI_IA32, Firmware.UEFI_HTTP_IA32),
          (Firmware.UEFI_ARM32, Firmware.UEFI_HTTP_ARM32),
          (Firmware.UEFI_ARM64, Firmware.UEFI_HTTP_ARM64),
          (Firmware.UEFI_RISCV32, Firmware.UEFI_HTTP_RISCV32),
          (Firmware.UEFI_RISCV64, Firmware.UEFI_HTTP_RISCV64),
          (Firmware.UEFI_RISCV128, Firmware.UEFI_HTTP_RISCV128),
          (Firmware.UEFI_LOONGARCH32, Firmware.UEFI_HTTP_LOONGARCH32),
          (Firmware.UEFI_LOONGARCH64, Firmware.UEFI_HTTP_LOONGARCH64),
          (Firmware.UBOOT_ARM32, Firmware.UBOOT_HTTP_ARM32),
          (Firmware.UBOOT_ARM64, Firmware.UBOOT_HTTP_ARM64)]
_COUNTERPART = {**dict(_PAIRS), **{b: a for a, b in _PAIRS}}


def loader_slot(firmware: Firmware | str) -> str:
    """The loader slot of a Firmware, of a slot name ("uefi-arm64") or an old name
    ("uefi-x64").  Unrecognised text takes the BIOS slot, the most common old ROM's."""
    if isinstance(firmware, Firmware):
        return BIOS if firmware is Firmware.OTHER else firmware.slot
    name = str(firmware).lower()
    if name in _ALIASES:
        return _ALIASES[name]
    return name if name in LOADER_SLOTS else BIOS


def check_slot(name: str) -> str:
    """`name` if it is a loader slot, else ValueError listing them."""
    if name not in LOADER_SLOTS:
        raise ValueError(f"unknown loader slot {name!r} (slots: {', '.join(LOADER_SLOTS)})")
    return name


def refusal(firmware: Firmware, who: str, arch: int | None = None) -> str:
    """Why a client of this firmware gets no offer (for the log)."""
    if firmware is Firmware.UNKNOWN:
        named = f"architecture type {arch}" if arch is not None else "no architecture type"
        return f"{who}: boot client names {named}, not in the IANA registry; no offer"
    return (f"{who}: no loader for {firmware.slot!r} clients (set loader_{firmware.slot} "
            "on the node, or on its type); no offer")
