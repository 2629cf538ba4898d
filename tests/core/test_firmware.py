"""One table from a client's architecture type to its Firmware and loader slot."""

from __future__ import annotations

import pytest

from bootherd.dhcp.codec import DhcpMessage, classify_client
from bootherd.firmware import (
    ARCHITECTURES,
    COLUMN_SLOTS,
    DEFAULT_LOADERS,
    LOADER_SLOTS,
    MAP_SLOTS,
    ClientArch,
    Firmware,
    loader_slot,
    pxe_firmware,
)
from bootherd.inventory import schema as s
from bootherd.inventory.memory import snapshot_from_text
from bootherd.inventory.testbed import TestbedError, generate


@pytest.mark.parametrize("name,slot", [
    ("bios", "bios"), ("bios-pxe", "bios"), ("uefi", "uefi"), ("uefi-x64", "uefi"),
    ("uefi-arm64", "uefi-arm64"), ("http", "http"), ("uefi-http-x64", "http"),
    ("uefi-http-arm64", "http-arm64"), ("ipxe", "ipxe"), ("UEFI-X64", "uefi"),
    ("other", "bios"), ("", "bios"), ("pxe", "bios"), ("uefi-riscv64", "uefi-riscv64"),
    (Firmware.UEFI_HTTP, "http"), (Firmware.IPXE, "ipxe"), (Firmware.OTHER, "bios"),
    (Firmware.UEFI_ARM64, "uefi-arm64")])
def test_loader_slot(name, slot):
    assert loader_slot(name) == slot


def test_the_table_is_the_iana_registry_and_every_slot_is_reachable():
    # Types 0-41 are assigned (IANA "Processor Architecture Types"); each is a row.
    assert sorted(ARCHITECTURES) == list(range(42)) == sorted(ClientArch)
    slots = {a.firmware.slot for a in ARCHITECTURES.values()}
    assert slots | {"ipxe"} == set(LOADER_SLOTS)
    # Only x86 has built-in loaders (Debian's iPXE binaries): arm64 must never get one.
    assert set(DEFAULT_LOADERS) == {"bios", "uefi", "http"}
    assert ARCHITECTURES[11].firmware.slot == "uefi-arm64"
    assert ARCHITECTURES[19].firmware.slot == "http-arm64"
    assert ARCHITECTURES[7].firmware is ARCHITECTURES[9].firmware is Firmware.UEFI_X64


def test_every_column_slot_has_a_column_and_a_node_has_all_of_them(memory_snapshot):
    assert set(COLUMN_SLOTS) | MAP_SLOTS == set(LOADER_SLOTS)
    for slot in COLUMN_SLOTS:
        assert f"loader_{slot}" in s.nodes.c and f"loader_{slot}" in s.node_types.c
    assert "loaders" in s.nodes.c and "loaders" in s.node_types.c
    node = memory_snapshot.nodes["pc1"]
    assert set(COLUMN_SLOTS) <= set(node.loaders)


def _client(vendor_class: bytes, arch: int | None) -> DhcpMessage:
    opts = {53: b"\x01", 60: vendor_class}
    if arch is not None:
        opts[93] = arch.to_bytes(2, "big")
    return DhcpMessage(op=1, chaddr=bytes(6) + bytes(10), options=opts)


@pytest.mark.parametrize("arch", [*range(42), 42, 255, 0xFFFF])
def test_the_classifier_reads_the_table(arch):
    """Every registered architecture gets its row's slot for the way it asks (PXE or
    HTTP); an unregistered one is UNKNOWN (refused), never some other slot."""
    row = ARCHITECTURES.get(arch)
    for vc, http in ((b"PXEClient", False), (b"HTTPClient", True)):
        got = classify_client(_client(b"%s:Arch:%05d" % (vc, arch), arch))
        assert got is pxe_firmware(arch, http)
        if row is None:
            assert got is Firmware.UNKNOWN
        elif row.firmware.http == http:
            assert got is row.firmware
        else:
            assert got is Firmware.UNKNOWN or got.http == http
        # Without option 93 the architecture is read from option 60.
        assert classify_client(_client(b"%s:Arch:%05d:UNDI:003000" % (vc, arch), None)) is got


def test_no_architecture_named():
    assert classify_client(_client(b"PXEClient", None)) is Firmware.BIOS_PXE  # pre-RFC 4578
    assert classify_client(_client(b"HTTPClient", None)) is Firmware.UNKNOWN
    assert classify_client(_client(b"HTTPClient:Arch:00007", None)) is Firmware.UEFI_HTTP
    assert classify_client(_client(b"PXEClient:Arch:00016", None)) is Firmware.UEFI_X64


def _testbed(type_extra: str = "", node_extra: str = "") -> str:
    text = generate(2, subnet="10.5.0.0/24")
    head, sep, tail = text.partition("[[nodes]]")
    text = head.replace('loader_ipxe = ""\n', 'loader_ipxe = ""\n' + type_extra) + sep + tail
    marker = 'node_id = "pc1"\n'
    assert marker in text
    return text.replace(marker, marker + node_extra, 1)


def test_loader_maps_per_type_and_per_node():
    snap = snapshot_from_text(_testbed(
        type_extra='loaders = { uefi-arm64 = "arm/grubaa64.efi", http-arm64 = "arm/h.efi" }\n',
        node_extra='loaders = { uefi-arm64 = "own/grubaa64.efi" }\n'))
    pc1, pc2 = snap.nodes["pc1"], snap.nodes["pc2"]
    assert pc1.loaders["uefi-arm64"] == "own/grubaa64.efi"  # the node's own wins
    assert pc1.loaders["http-arm64"] == "arm/h.efi"  # else its type's
    assert pc1.loaders["uefi"] == pc2.loaders["uefi"] == "snponly.efi"
    assert pc2.loaders["uefi-arm64"] == "arm/grubaa64.efi"
    assert "uefi-riscv64" not in pc2.loaders


@pytest.mark.parametrize("bad,why", [
    ('loaders = { bios = "x" }\n', "set it with loader_bios"),
    ('loaders = { arm64 = "x" }\n', "unknown loader slot"),
    ('loaders = { uefi-arm64 = "" }\n', "must not be empty"),
    ('loaders = { uefi-arm64 = 5 }\n', "expected dict"),
    (f'loaders = {{ uefi-arm64 = "{"x" * 256}" }}\n', "longer than 255"),
])
def test_bad_loader_maps_are_refused_naming_the_slot(bad, why):
    with pytest.raises(TestbedError, match=why):
        snapshot_from_text(_testbed(node_extra=bad))
