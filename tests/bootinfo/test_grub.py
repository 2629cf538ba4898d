"""GRUB configurations: rendered per decision, and fetched with real clients over HTTP
(curl) and TFTP (curl tftp://, through bootherd's TFTP service and its resolver)."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from aiohttp import web
from sqlalchemy import update

from bootherd.bootinfo import grub
from bootherd.bootinfo.grub import MENU_TEXT, render_config
from bootherd.boottype import BootType
from bootherd.config import build
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.lifecycle import Lifecycle, Via
from bootherd.loaders import SystemLoaders
from bootherd.metrics import Metrics
from bootherd.policy import BootDecision
from bootherd.procs import free_port
from bootherd.service import Context
from bootherd.states import State

SUBNET = "127.68.0.0/24"


def test_kernel_config_fetches_over_tftp_with_one_line_cmdline():
    d = BootDecision(BootType.MB, server="10.0.0.1", path="/kernels/vmlinuz",
                     initrd="kernels/initrd.img", cmdline="console=ttyS0\nquiet 'x'", image="L")
    lines = render_config(d, None, "10.0.0.1").splitlines()
    assert "linux (tftp,10.0.0.1)/kernels/vmlinuz console=ttyS0 quiet x" in lines
    assert "initrd (tftp,10.0.0.1)/kernels/initrd.img" in lines
    assert "boot" in lines and lines[-1] == "sleep 5"  # a failed boot asks again


def test_other_server_and_ipv6_server():
    d = BootDecision(BootType.MFS, server="10.5.5.5", path="/tftpboot/frisbee")
    assert "linux (tftp,10.5.5.5)/tftpboot/frisbee" in render_config(d, None, "10.0.0.1")
    assert "linux (tftp,[fd00::1])/k" in render_config(BootDecision(BootType.MB, path="k"), None,
                                                       "fd00::1")


@pytest.mark.parametrize("t", [BootType.PART, BootType.SYSID, BootType.DISKPART])
def test_local_disk_returns_to_the_firmware(t):
    assert render_config(BootDecision(t, partition=1), None, "10.0.0.1").splitlines()[-1] == "exit 1"


def test_wait_reboot_auto():
    wait = render_config(BootDecision(BootType.WAIT, reason="not allocated"), None, "10.0.0.1")
    assert "waits (not allocated)" in wait and wait.splitlines()[-1] == "sleep 5"
    assert render_config(BootDecision(BootType.REBOOT), None, "10.0.0.1").splitlines()[-1] == "reboot"
    assert render_config(BootDecision(BootType.AUTO), None, "10.0.0.1").splitlines()[-1] == "true"
    # The menu loops: per MAC, then the default, asking again after every answer.
    assert "while true; do" in MENU_TEXT and "grub.cfg-${net_default_mac}" in MENU_TEXT
    assert "grub.cfg-default" in MENU_TEXT


# ---------------------------------------------------------------- live, real clients


@pytest.fixture
async def grub_ctx(tmp_path):
    if not shutil.which("curl"):
        pytest.skip("curl not installed")
    e = make_engine(f"sqlite:///{tmp_path}/i.db")
    upgrade(e)
    import_testbed(e, generate(20, subnet=SUBNET))
    http_port, tftp_port = free_port(), free_port()
    (tmp_path / "tftp").mkdir()
    cfg = build({"http": {"port": http_port},
                 "tftp": {"port": tftp_port, "root": str(tmp_path / "tftp")}})
    live = LiveInventory(e, poll_interval=0.05, write_batch_interval=0.01)
    snap = live.snapshot
    allocated = sorted((n for n in snap.nodes.values() if n.allocation), key=lambda n: n.node_id)
    free = sorted((n for n in snap.nodes.values() if not n.allocation), key=lambda n: n.node_id)
    roles = {"kernel": allocated[0], "next": allocated[1], "wait": free[0]}
    with e.begin() as c:
        c.execute(update(s.nodes).where(s.nodes.c.node_id == roles["kernel"].node_id)
                  .values(default_os="LINUX-NETBOOT"))
        c.execute(update(s.nodes).where(s.nodes.c.node_id == roles["next"].node_id)
                  .values(next_os="LINUX-NETBOOT"))
    await live.refresh()
    await live.start()
    ctx = Context(cfg, live, Metrics())
    from bootherd.tftp.service import TFTPService

    lifecycle = Lifecycle(cfg, live, ctx.metrics, "test")
    ctx.lifecycle = lifecycle  # type: ignore[attr-defined] - for the tests below
    configs = grub.GrubConfigs(cfg, live, ctx.metrics, lifecycle)
    tftp = TFTPService(ctx, lifecycle, configs)
    await tftp.start()
    app = web.Application()
    grub.add_routes(app, configs)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", http_port).start()
    await web.TCPSite(runner, "127.0.0.3", http_port).start()  # a second address of "ours"
    yield ctx, http_port, tftp_port, {k: live.snapshot.nodes[v.node_id] for k, v in roles.items()}
    await runner.cleanup()
    await tftp.stop()
    await live.stop()
    e.dispose()


async def _curl(url: str, source: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-g", "-sS", "--max-time", "5", "--interface", source, "-w", "\n%{http_code}",
        url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    text, _, code = out.decode().rpartition("\n")
    return (int(code) if code.isdigit() else -1), text if proc.returncode == 0 else err.decode()


async def test_per_node_configs_over_http_and_tftp(grub_ctx):
    ctx, hport, tport, nodes = grub_ctx
    k = nodes["kernel"]
    for url in (f"http://127.0.0.1:{hport}/grub/grub.cfg-{k.control_mac}",
                f"tftp://127.0.0.1:{tport}/grub/grub.cfg-{k.control_mac}"):
        code, text = await _curl(url, k.control_ip)
        assert code in (200, 0), text  # curl reports 0 for TFTP
        assert f"# bootherd: {k.node_id}: MB LINUX-NETBOOT" in text
        assert "linux (tftp,127.0.0.1)/kernels/vmlinuz console=ttyS0 quiet" in text
    assert ctx.live.state_of(k.node_id)[0] == State.BOOTING
    code, menu = await _curl(f"tftp://127.0.0.1:{tport}/grub/grub.cfg", k.control_ip)
    assert menu == MENU_TEXT


async def test_config_names_the_address_the_request_arrived_on(grub_ctx):
    # server.public_address unset: the kernel comes from the address GRUB asked, as
    # every other reply does (never a default that is not this server's).
    _, hport, _, nodes = grub_ctx
    k = nodes["kernel"]
    _, text = await _curl(f"http://127.0.0.3:{hport}/grub/grub.cfg-{k.control_mac}",
                          k.control_ip)
    assert "linux (tftp,127.0.0.3)/kernels/vmlinuz" in text, text


async def test_a_node_only_sees_its_own_config_and_unknown_macs_fall_to_the_default(grub_ctx):
    ctx, hport, _, nodes = grub_ctx
    k, w = nodes["kernel"], nodes["wait"]
    # The source address wins over the MAC in the name.
    _, text = await _curl(f"http://127.0.0.1:{hport}/grub/grub.cfg-{k.control_mac}",
                          w.control_ip)
    assert f"# bootherd: {w.node_id}: WAIT" in text and "kernels" not in text
    assert ctx.lifecycle.core.waiting[w.node_id] is Via.IPXE  # the waiting set iPXE joins
    # An address the inventory lacks: the MAC names the node; an unknown MAC is not found,
    # so GRUB goes on to grub.cfg-default (the new-node decision).
    _, text = await _curl(f"http://127.0.0.1:{hport}/grub/grub.cfg-{k.control_mac}",
                          "127.68.1.50")
    assert f"# bootherd: {k.node_id}: MB" in text
    code, _ = await _curl(f"http://127.0.0.1:{hport}/grub/grub.cfg-02:99:99:99:99:99",
                          "127.68.1.50")
    assert code == 404
    _, text = await _curl(f"http://127.0.0.1:{hport}/grub/grub.cfg-default", "127.68.1.50")
    assert "# bootherd: unknown node: MFS NEWNODE-MFS" in text
    code, _ = await _curl(f"http://127.0.0.1:{hport}/grub/grub.cfg-not-a-mac", "127.68.1.50")
    assert code == 404


async def test_one_shot_next_os_is_served_once(grub_ctx):
    ctx, hport, _, nodes = grub_ctx
    n = nodes["next"]
    url = f"http://127.0.0.1:{hport}/grub/grub.cfg-{n.control_mac}"
    _, first = await _curl(url, n.control_ip)
    _, second = await _curl(url, n.control_ip)
    assert "MB LINUX-NETBOOT" in first and "LINUX-NETBOOT" not in second


def test_system_loaders_only_where_the_root_has_none(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "real.efi").write_bytes(b"from the package")
    (tmp_path / "pkg" / "link.efi").symlink_to(tmp_path / "pkg" / "real.efi")
    root = tmp_path / "root"
    root.mkdir()
    table = {"ipxe.efi": (str(tmp_path / "pkg/link.efi"), "ipxe"),
             "gone.efi": (str(tmp_path / "pkg/gone.efi"), "x")}
    loaders = SystemLoaders(root, True, table)
    assert loaders.path("ipxe.efi") == tmp_path / "pkg/real.efi"  # the link's target
    assert loaders.read("ipxe.efi") == b"from the package"
    assert loaders.read("gone.efi") is None and loaders.read("other.efi") is None
    (root / "ipxe.efi").write_bytes(b"the operator's")
    assert loaders.read("ipxe.efi") is None  # the root's own file wins
    assert SystemLoaders(tmp_path / "empty", False, table).read("ipxe.efi") is None
