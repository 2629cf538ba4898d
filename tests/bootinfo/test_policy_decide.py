"""Decision table of bootherd.policy: every branch of decide_boot and dhcp_boot."""

from __future__ import annotations

import dataclasses

import pytest
from sqlalchemy import select, update

from bootherd.config import build
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.model import Allocation
from bootherd.inventory.snapshot import load
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.policy import (
    BootDecision,
    BootType,
    clear_next_os,
    decide_boot,
    dhcp_boot,
    ipxe_script_url,
    split_server_path,
)

CFG = build({"server": {"public_address": "10.9.0.1"}, "http": {"port": 8088}})
SERVER = "10.9.0.1"  # the advertised address dhcp_boot is handed (policy.advertised)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    e = make_engine(f"sqlite:///{tmp_path_factory.mktemp('policy')}/i.db")
    upgrade(e)
    import_testbed(e, generate(20, subnet="127.21.0.0/24"))
    return e


@pytest.fixture(scope="module")
def snap(engine):
    return load(engine)


@pytest.fixture
def node(snap):
    n = next(n for n in snap.nodes.values() if n.allocation is not None)
    return dataclasses.replace(n, next_os=None, temp_os=None, default_os="UBUNTU22-64-STD",
                               pxe_loader="", boot_cmdline="", bios_disk=None)


def test_unknown_node_gets_newnode_image(snap):
    d = decide_boot(snap, None, CFG)
    assert d.type is BootType.MFS
    # A bare path: this server, whose address each reply fills in (None here).
    assert (d.server, d.path, d.image) == (None, "/tftpboot/newnode", "NEWNODE-MFS")


def test_unknown_node_gets_configured_newnode_mfs(snap):
    cfg = build({"bootinfo": {"newnode_mfs": "10.1.1.1:/mfs/enroll console=ttyS1"}})
    d = decide_boot(snap, None, cfg)
    assert (d.type, d.server, d.path, d.cmdline) == (BootType.MFS, "10.1.1.1", "/mfs/enroll",
                                                     "console=ttyS1")


def test_unknown_node_without_newnode_image_waits(snap):
    bare = dataclasses.replace(snap, os_images={})
    assert decide_boot(bare, None, CFG).type is BootType.WAIT


def test_unallocated_waits(snap, node):
    d = decide_boot(snap, dataclasses.replace(node, allocation=None), CFG)
    assert d.type is BootType.WAIT and d.reason == "not allocated"


def test_unallocated_old_client_version_is_not_told_to_wait(snap, node):
    d = decide_boot(snap, dataclasses.replace(node, allocation=None), CFG, client_version=0)
    assert d.type is BootType.PART


def test_other_loader_reboots(snap, node):
    assert decide_boot(snap, dataclasses.replace(node, pxe_loader="grub.efi"),
                       CFG).type is BootType.REBOOT
    # Set to our own loader: no reboot.
    same = dataclasses.replace(node, pxe_loader=CFG.bootinfo.loader)
    assert decide_boot(snap, same, CFG).type is BootType.PART


def test_part_and_diskpart(snap, node):
    d = decide_boot(snap, node, CFG)
    assert d == BootDecision(BootType.PART, partition=1, image="UBUNTU22-64-STD",
                             reason="default_os")
    d = decide_boot(snap, dataclasses.replace(node, bios_disk=0x81), CFG)
    assert (d.type, d.disk, d.partition) == (BootType.DISKPART, 0x81, 1)


def test_sysid_when_image_has_no_partition(snap, node):
    img = dataclasses.replace(snap.os_images["FBSD13-64-STD"], partition=None)
    sn = dataclasses.replace(snap, os_images={**snap.os_images, img.name: img})
    d = decide_boot(sn, dataclasses.replace(node, default_os=img.name), CFG)
    assert (d.type, d.sysid) == (BootType.SYSID, 165)


def test_mfs_with_image_cmdline(snap, node):
    d = decide_boot(snap, dataclasses.replace(node, default_os="FRISBEE-MFS"), CFG)
    assert (d.type, d.server, d.path, d.cmdline) == (BootType.MFS, None,
                                                     "/tftpboot/frisbee", "console=ttyS0")


def test_kernel_bare_path_is_this_server(snap, node):
    d = decide_boot(snap, dataclasses.replace(node, default_os="LINUX-NETBOOT"), CFG)
    assert (d.type, d.server, d.path, d.initrd, d.cmdline) == (
        BootType.MB, None, "kernels/vmlinuz", "kernels/initrd.img", "console=ttyS0 quiet")


def test_kernel_host_path(snap, node):
    img = dataclasses.replace(snap.os_images["LINUX-NETBOOT"], path="10.3.3.3:/k/bzImage")
    sn = dataclasses.replace(snap, os_images={**snap.os_images, img.name: img})
    d = decide_boot(sn, dataclasses.replace(node, default_os=img.name), CFG)
    assert (d.type, d.server, d.path) == (BootType.MB, "10.3.3.3", "/k/bzImage")


def test_node_cmdline_overrides_image_cmdline(snap, node):
    n = dataclasses.replace(node, default_os="LINUX-NETBOOT", boot_cmdline="single")
    assert decide_boot(snap, n, CFG).cmdline == "single"


def test_order_next_then_temp_then_default(snap, node):
    n = dataclasses.replace(node, next_os="FRISBEE-MFS", temp_os="LINUX-NETBOOT")
    d = decide_boot(snap, n, CFG)
    assert (d.image, d.consumes_next_os, d.reason) == ("FRISBEE-MFS", True, "next_os")
    d = decide_boot(snap, dataclasses.replace(n, next_os=None), CFG)
    assert (d.image, d.consumes_next_os, d.reason) == ("LINUX-NETBOOT", False, "temp_os")
    d = decide_boot(snap, dataclasses.replace(n, next_os=None, temp_os=None), CFG)
    assert (d.image, d.consumes_next_os) == ("UBUNTU22-64-STD", False)


def test_dangling_image_falls_through(snap, node):
    d = decide_boot(snap, dataclasses.replace(node, next_os="GONE"), CFG)
    assert d.image == "UBUNTU22-64-STD" and not d.consumes_next_os


def test_nothing_set_waits(snap, node):
    d = decide_boot(snap, dataclasses.replace(node, default_os=None), CFG)
    assert d.type is BootType.WAIT and d.reason == "no boot OS set"


def test_boots_property():
    assert BootDecision(BootType.MB).boots and not BootDecision(BootType.WAIT).boots


def test_split_server_path():
    assert split_server_path("1.2.3.4:/x", "9.9.9.9") == ("1.2.3.4", "/x")
    assert split_server_path("fs:/x", "9.9.9.9") == ("9.9.9.9", "fs:/x")
    assert split_server_path("k/vmlinuz", "9.9.9.9") == ("9.9.9.9", "k/vmlinuz")
    assert split_server_path("k/vmlinuz") == (None, "k/vmlinuz")


# ---------------------------------------------------------------------- DHCP


def test_dhcp_boot_known_node(snap, node):
    assert dhcp_boot(snap, node, "bios", SERVER, CFG) == ("undionly.kpxe", "10.9.0.1")
    assert dhcp_boot(snap, node, "uefi", SERVER, CFG) == ("snponly.efi", "10.9.0.1")
    assert dhcp_boot(snap, node, "http", SERVER, CFG) == ("http://10.9.0.1:8088/boot/ipxe.efi",
                                                  "10.9.0.1")
    own = dataclasses.replace(node, loaders={**node.loaders, "bios": "custom.kpxe"})
    assert dhcp_boot(snap, own, "bios", SERVER, CFG)[0] == "custom.kpxe"


def test_dhcp_boot_pinned_pxe_loader(snap, node):
    pinned = dataclasses.replace(node, pxe_loader="grubnetx64.efi")
    assert decide_boot(snap, pinned, CFG).type is BootType.REBOOT
    assert dhcp_boot(snap, pinned, "uefi", SERVER, CFG) == ("grubnetx64.efi", "10.9.0.1")
    assert dhcp_boot(snap, pinned, "ipxe", SERVER, CFG)[0] == ipxe_script_url(CFG, SERVER)


def test_dhcp_boot_ipxe_gets_script_url_not_binary(snap, node):
    url, _ = dhcp_boot(snap, node, "ipxe", SERVER, CFG)
    assert url == "http://10.9.0.1:8088/ipxe?mac=${netX/mac:hexhyp}" == ipxe_script_url(CFG, SERVER)
    assert not url.endswith((".kpxe", ".efi"))  # no chainload loop


def test_dhcp_boot_unknown_node_fallbacks(snap):
    assert dhcp_boot(snap, None, "bios", SERVER, CFG)[0] == "undionly.kpxe"
    assert dhcp_boot(snap, None, "uefi", SERVER, CFG)[0] == "snponly.efi"
    assert dhcp_boot(snap, None, "ipxe", SERVER, CFG)[0].startswith("http://10.9.0.1:8088/ipxe?")


def test_dhcp_boot_unknown_node_uses_named_type(snap):
    class Dhcp:
        newnode_type = "x1"

    class Cfg:
        server, http, bootinfo = CFG.server, CFG.http, CFG.bootinfo
        dhcp = Dhcp()

    types = {**snap.node_types, "x1": {"name": "x1", "loader_bios": "x1.kpxe",
                                       "loader_uefi": "", "loader_http": "", "loader_ipxe": ""}}
    sn = dataclasses.replace(snap, node_types=types)
    assert dhcp_boot(sn, None, "bios", SERVER, Cfg())[0] == "x1.kpxe"
    assert dhcp_boot(sn, None, "uefi", SERVER, Cfg())[0] == "snponly.efi"


# ------------------------------------------------------------- one-shot next_os


def test_clear_next_os_only_clears_what_was_served(engine):
    nid = "pc3"
    with engine.begin() as c:
        c.execute(update(s.nodes).where(s.nodes.c.node_id == nid).values(next_os="FRISBEE-MFS"))
    assert not clear_next_os(engine, nid, "LINUX-NETBOOT")  # operator changed it meanwhile
    assert clear_next_os(engine, nid, "FRISBEE-MFS")
    with engine.connect() as c:
        assert c.execute(select(s.nodes.c.next_os).where(s.nodes.c.node_id == nid)).scalar() \
            is None
    assert not clear_next_os(engine, nid)


def test_one_shot_served_then_cleared(engine, snap):
    nid = next(n.node_id for n in snap.nodes.values() if n.allocation is not None)
    with engine.begin() as c:
        c.execute(update(s.nodes).where(s.nodes.c.node_id == nid).values(next_os="FRISBEE-MFS"))
    first = decide_boot(load(engine), load(engine).nodes[nid], CFG)
    assert first.image == "FRISBEE-MFS" and first.consumes_next_os
    clear_next_os(engine, nid, first.image)
    again = load(engine)
    second = decide_boot(again, again.nodes[nid], CFG)
    assert second.image == "UBUNTU22-64-STD" and not second.consumes_next_os


def test_allocation_model_sanity(node):
    assert isinstance(node.allocation, Allocation)
