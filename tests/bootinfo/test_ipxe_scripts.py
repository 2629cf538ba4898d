"""iPXE scripts: rendered per decision, and fetched with curl from a live aiohttp app."""

from __future__ import annotations

import asyncio
import shutil
import socket

import pytest
from aiohttp import web
from sqlalchemy import update

from bootherd.bootinfo.ipxe import add_routes, render_script
from bootherd.config import build
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.lifecycle import Lifecycle, Via
from bootherd.metrics import Metrics
from bootherd.policy import BootDecision, BootType
from bootherd.service import Context
from bootherd.states import State

SUBNET = "127.67.0.0/24"
CFG = build({"server": {"public_address": "10.0.0.1"}, "http": {"port": 8080}})


def test_kernel_script_with_initrd():
    d = BootDecision(BootType.MB, server="10.0.0.1", path="kernels/vmlinuz",
                     initrd="kernels/initrd.img", cmdline="console=ttyS0\nshell", image="L")
    text = render_script(d, None, CFG)
    lines = text.splitlines()
    assert lines[0] == "#!ipxe"
    assert "kernel http://10.0.0.1:8080/files/kernels/vmlinuz initrd=initrd.img " \
           "console=ttyS0 shell || goto failed" in lines
    assert "initrd http://10.0.0.1:8080/files/kernels/initrd.img || goto failed" in lines
    assert "boot || goto failed" in lines
    assert "shell" not in [ln.strip() for ln in lines]  # newline in cmdline did not inject


def test_kernel_on_other_server_uses_tftp():
    d = BootDecision(BootType.MB, server="10.5.5.5", path="/k/bz Image")
    assert "kernel tftp://10.5.5.5/k/bz%20Image || goto failed" in render_script(d, None, CFG)


def test_mfs_script():
    d = BootDecision(BootType.MFS, server="10.0.0.1", path="/tftpboot/frisbee",
                     cmdline="console=ttyS0", image="FRISBEE-MFS")
    text = render_script(d, None, CFG)
    assert "kernel http://10.0.0.1:8080/files/tftpboot/frisbee console=ttyS0 || goto failed" \
        in text


@pytest.mark.parametrize("d,drive", [
    (BootDecision(BootType.PART, partition=1), "0x80"),
    (BootDecision(BootType.SYSID, sysid=165), "0x80"),
    (BootDecision(BootType.DISKPART, disk=1, partition=2), "0x81"),
    (BootDecision(BootType.DISKPART, disk=0x82, partition=2), "0x82"),
])
def test_local_disk_scripts(d, drive):
    text = render_script(d, None, CFG)
    assert f"sanboot --no-describe --drive {drive} || goto failed" in text
    assert "iseq ${platform} efi && goto uefi ||" in text  # UEFI hands back to firmware


def test_wait_script_loops_on_itself():
    url = "http://10.0.0.1:8080/ipxe?mac=02-00-00-00-00-08"
    text = render_script(BootDecision(BootType.WAIT, reason="not allocated"), None, CFG, url)
    assert ":wait" in text and "sleep 5" in text
    assert f"chain --replace --autofree {url} || goto wait" in text


def test_reboot_and_auto():
    assert render_script(BootDecision(BootType.REBOOT), None, CFG).splitlines()[-1] == "reboot"
    assert "chain --replace --autofree http://10.0.0.1:8080/ipxe" in \
        render_script(BootDecision(BootType.AUTO), None, CFG)


# ---------------------------------------------------------------- live, with curl


def free_tcp_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


@pytest.fixture
async def app_ctx(tmp_path):
    if not shutil.which("curl"):
        pytest.skip("curl not installed")
    e = make_engine(f"sqlite:///{tmp_path}/i.db")
    upgrade(e)
    import_testbed(e, generate(20, subnet=SUBNET))
    port = free_tcp_port()
    cfg = build({"http": {"port": port}})
    live = LiveInventory(e, poll_interval=0.05, write_batch_interval=0.01)
    snap = live.snapshot
    allocated = sorted((n for n in snap.nodes.values() if n.allocation), key=lambda n: n.node_id)
    free = sorted((n for n in snap.nodes.values() if not n.allocation), key=lambda n: n.node_id)
    roles = {"part": allocated[0], "kernel": allocated[1], "mfs": allocated[2],
             "reboot": allocated[3], "wait": free[0]}
    with e.begin() as c:
        for role, os_name in (("kernel", "LINUX-NETBOOT"), ("mfs", "FRISBEE-MFS")):
            c.execute(update(s.nodes).where(s.nodes.c.node_id == roles[role].node_id)
                      .values(default_os=os_name))
        c.execute(update(s.nodes).where(s.nodes.c.node_id == roles["reboot"].node_id)
                  .values(pxe_loader="grubnet.efi"))
    await live.refresh()
    await live.start()
    ctx = Context(cfg, live, Metrics())
    lifecycle = Lifecycle(cfg, live, ctx.metrics, "test")
    ctx.lifecycle = lifecycle  # type: ignore[attr-defined] - for the tests below
    app = web.Application()
    add_routes(app, cfg, live, ctx.metrics, lifecycle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield ctx, port, {k: live.snapshot.nodes[v.node_id] for k, v in roles.items()}
    await runner.cleanup()
    await live.stop()
    e.dispose()


async def curl(port: int, source: str, query: str = "") -> str:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-g", "-sS", "--fail", "--max-time", "5", "--interface", source,
        f"http://127.0.0.1:{port}/ipxe{query}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_live_scripts_per_decision(app_ctx):
    ctx, port, nodes = app_ctx
    base = f"http://127.0.0.1:{port}"

    text = await curl(port, nodes["part"].control_ip)
    assert text.startswith("#!ipxe\n") and "sanboot --no-describe --drive 0x80" in text
    assert ctx.live.state_of(nodes["part"].node_id)[0] == State.BOOTING

    text = await curl(port, nodes["kernel"].control_ip)
    assert f"kernel {base}/files/kernels/vmlinuz initrd=initrd.img console=ttyS0 quiet" in text
    assert f"initrd {base}/files/kernels/initrd.img" in text

    text = await curl(port, nodes["mfs"].control_ip)
    assert f"kernel {base}/files/tftpboot/frisbee console=ttyS0" in text

    text = await curl(port, nodes["reboot"].control_ip)
    assert text.splitlines()[-2:] == ["chain tftp://127.0.0.1/grubnet.efi ||", "reboot"]
    assert ctx.live.state_of(nodes["reboot"].node_id)[0] == State.REBOOTING

    text = await curl(port, nodes["wait"].control_ip)
    assert f"chain --replace --autofree {base}/ipxe || goto wait" in text
    assert ctx.live.state_of(nodes["wait"].node_id)[0] == State.PXEWAIT
    # Waiting in iPXE, which asks again by itself: never a candidate for an ORDER.
    assert ctx.lifecycle.core.waiting[nodes["wait"].node_id] is Via.IPXE

    c = ctx.metrics.protocol("ipxe")
    assert c["requests"] == 5 and c["reply_wait"] == 1


async def test_mac_identifies_unknown_source(app_ctx):
    ctx, port, nodes = app_ctx
    n = nodes["kernel"]
    mac = n.control_mac.replace(":", "-")
    text = await curl(port, "127.67.1.200", f"?mac={mac}")
    assert "kernels/vmlinuz" in text and n.node_id in text
    # The source address wins over mac=: a node cannot ask for another's script.
    text = await curl(port, nodes["part"].control_ip, f"?mac={mac}")
    assert "sanboot" in text and nodes["part"].node_id in text


async def test_unknown_node_gets_newnode_and_bad_mac_is_harmless(app_ctx):
    ctx, port, _ = app_ctx
    text = await curl(port, "127.67.1.201", "?mac=not-a-mac")
    assert "# bootherd: unknown node: MFS NEWNODE-MFS" in text
    assert "/files/tftpboot/newnode" in text
    text = await curl(port, "127.67.1.201", "?mac=${netX/mac:hexhyp}")  # unexpanded
    assert "unknown node" in text
    assert ctx.metrics.protocol("ipxe")["unknown_nodes"] == 2


async def test_wait_then_allocated_script_changes(app_ctx):
    ctx, port, nodes = app_ctx
    n = nodes["wait"]
    assert "goto wait" in await curl(port, n.control_ip)
    ops = pytest.importorskip("bootherd.inventory.ops")
    pid, eid = next(iter(ctx.live.snapshot.experiments))
    await asyncio.to_thread(ops.allocate, ctx.live.engine, pid, eid, n.node_id, "late")
    for _ in range(250):
        if ctx.live.snapshot.nodes[n.node_id].allocation is not None:
            break
        await asyncio.sleep(0.02)
    text = await curl(port, n.control_ip)
    assert "sanboot" in text
    assert ctx.live.state_of(n.node_id)[0] == State.BOOTING
    assert n.node_id not in ctx.lifecycle.core.waiting
