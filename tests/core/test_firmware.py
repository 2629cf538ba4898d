"""One mapping from a client's architecture to its Firmware and from that to a loader slot."""

from __future__ import annotations

import pytest

from bootherd.dhcp.codec import DhcpMessage, classify_client
from bootherd.firmware import (
    HTTP_ARCH,
    LOADER_SLOT,
    LOADER_SLOTS,
    PXE_ARCH,
    ClientArch,
    Firmware,
    loader_slot,
)
from bootherd.inventory import schema as s


@pytest.mark.parametrize("fw,slot", [
    ("bios", "bios"), ("bios-pxe", "bios"), ("uefi", "uefi"), ("uefi-x64", "uefi"),
    ("uefi-arm64", "uefi"), ("http", "http"), ("uefi-http-x64", "http"), ("ipxe", "ipxe"),
    ("UEFI-X64", "uefi"), ("other", "bios"), ("", "bios"), ("pxe", "bios"),
    (Firmware.UEFI_HTTP, "http"), (Firmware.IPXE, "ipxe"), (Firmware.OTHER, "bios")])
def test_loader_slot(fw, slot):
    assert loader_slot(fw) == slot


def test_every_firmware_has_a_slot_and_every_slot_a_column(memory_snapshot):
    assert set(LOADER_SLOT) == set(Firmware)
    assert set(LOADER_SLOT.values()) == set(LOADER_SLOTS)
    for slot in LOADER_SLOTS:
        assert f"loader_{slot}" in s.nodes.c and f"loader_{slot}" in s.node_types.c
    node = memory_snapshot.nodes["pc1"]
    assert set(node.loaders) == set(LOADER_SLOTS)


def _client(vendor_class: bytes, arch: int | None) -> DhcpMessage:
    opts = {53: b"\x01", 60: vendor_class}
    if arch is not None:
        opts[93] = arch.to_bytes(2, "big")
    return DhcpMessage(op=1, chaddr=bytes(6) + bytes(10), options=opts)


@pytest.mark.parametrize("arch", list(ClientArch))
def test_the_classifier_reads_the_tables(arch):
    """Every RFC 4578 architecture: the codec's answer is the table's, OTHER when absent."""
    assert classify_client(_client(b"PXEClient:Arch:%05d" % arch, arch)) is \
        PXE_ARCH.get(arch, Firmware.OTHER)
    assert classify_client(_client(b"HTTPClient:Arch:%05d" % arch, arch)) is \
        HTTP_ARCH.get(arch, Firmware.OTHER)
    # Without option 93 the architecture is read from option 60.
    assert classify_client(_client(b"PXEClient:Arch:%05d:UNDI:003000" % arch, None)) is \
        PXE_ARCH.get(arch, Firmware.OTHER)
