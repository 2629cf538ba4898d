"""Every reply names this server by the address its request arrived on, unless
server.public_address says otherwise: bootinfo's MB/MFS server, iPXE scripts (kernel,
initrd, the WAIT loop, a pinned loader over TFTP), the TFTP per-node script, TMCD's
serviceinfo/ipodinfo/file servers.  Paths that name their own host keep it."""

from __future__ import annotations

import dataclasses

from bootherd.bootinfo import codec
from bootherd.bootinfo.core import BootinfoCore
from bootherd.bootinfo.ipxe import render_script
from bootherd.boottype import BootType
from bootherd.config import build
from bootherd.inventory.memory import snapshot_from_text
from bootherd.inventory.testbed import generate
from bootherd.policy import BootDecision, advertised, decide_boot, tftp_node_file
from bootherd.tmcd.views import Views, ViewSettings

SNAP = snapshot_from_text(generate(6, subnet="10.252.0.0/16"))
PC1 = SNAP.nodes["pc1"]
CFG = build({})  # public_address empty: derive
FIXED = build({"server": {"public_address": "10.252.9.9"}})
MFS = BootDecision(BootType.MFS, path="/tftpboot/frisbee", image="FRISBEE-MFS")
MB = BootDecision(BootType.MB, path="kernels/vmlinuz", initrd="kernels/initrd.img")


def test_advertised_prefers_the_configured_address() -> None:
    assert advertised(CFG, "10.252.0.1") == "10.252.0.1"
    assert advertised(FIXED, "10.252.0.1") == "10.252.9.9"


def test_bare_paths_are_this_server() -> None:
    n = dataclasses.replace(PC1, next_os="FRISBEE-MFS")
    assert decide_boot(SNAP, n, CFG).server is None
    assert decide_boot(SNAP, None, CFG).server is None  # NEWNODE-MFS


def bootinfo_answer(decision: BootDecision, here: str) -> codec.BootWhat:
    core = BootinfoCore(lambda snap, node, version: decision)
    out = core.handle(codec.request(), PC1.control_ip, SNAP, here)
    assert out is not None
    return codec.decode_boot_what(codec.decode(out.data).data)


def test_bootinfo_names_the_arrival_address() -> None:
    assert bootinfo_answer(MFS, "10.252.0.1").mfs == "10.252.0.1:/tftpboot/frisbee"
    assert bootinfo_answer(MB, "10.253.0.1").server == "10.253.0.1"
    other = dataclasses.replace(MFS, server="10.7.7.7")
    assert bootinfo_answer(other, "10.252.0.1").mfs == "10.7.7.7:/tftpboot/frisbee"


def test_ipxe_script_names_the_arrival_address() -> None:
    text = render_script(MB, PC1, CFG, server="10.252.0.1")
    assert "kernel http://10.252.0.1:8080/files/kernels/vmlinuz initrd=initrd.img" in text
    assert "initrd http://10.252.0.1:8080/files/kernels/initrd.img" in text
    assert "chain --replace --autofree http://10.252.0.1:8080/ipxe" in text
    wait = render_script(BootDecision(BootType.WAIT), PC1, CFG, server="10.252.0.1")
    assert "http://10.252.0.1:8080/ipxe" in wait
    pinned = dataclasses.replace(PC1, pxe_loader="grubnetx64.efi")
    reboot = render_script(BootDecision(BootType.REBOOT), pinned, CFG, server="10.252.0.1")
    assert "chain tftp://10.252.0.1/grubnetx64.efi ||" in reboot
    elsewhere = render_script(dataclasses.replace(MB, server="10.7.7.7"), PC1, CFG,
                              server="10.252.0.1")
    assert "kernel tftp://10.7.7.7/kernels/vmlinuz" in elsewhere
    for t in (text, wait, reboot):
        assert "127.0.0.1" not in t


def test_tftp_node_script_names_the_arrival_address() -> None:
    out = tftp_node_file(SNAP, PC1.control_ip, "bootherd.ipxe", CFG, "10.252.0.1")
    assert out == f"#!ipxe\nchain http://10.252.0.1:8080/ipxe?mac={PC1.control_mac}\n".encode()


def test_tmcd_names_the_arrival_address_from_one_cached_render() -> None:
    views = Views(ViewSettings.from_config(CFG, b"secret", None))
    a1 = views.ask(SNAP, PC1, server="10.252.0.1")
    a2 = views.ask(SNAP, PC1, server="10.253.0.1")
    assert views.reply(SNAP, a1, "serviceinfo") == \
        b"TFTP=10.252.0.1 DHCP=10.252.0.1 FRISBEE=10.252.0.1 PUBSUB=10.252.0.1\n"
    assert views.reply(SNAP, a2, "ipodinfo").startswith(b"HOST=10.253.0.1 ")
    assert views.renders == 1  # the address is put in at reply time
    assert b"\x01" not in views.fullconfig(SNAP, a1).encode()
    assert views.digest(SNAP, PC1) == views.digest(SNAP, PC1)
    fixed = Views(ViewSettings.from_config(FIXED, b"secret", None))
    assert fixed.reply(SNAP, fixed.ask(SNAP, PC1, server="10.252.0.1"), "serviceinfo") \
        .startswith(b"TFTP=10.252.9.9 ")
