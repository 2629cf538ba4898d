"""`bootherd node wake` (through the running server, or alone when none runs) and
`bootherd node events`."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from bootherd.bootinfo import codec
from bootherd.bootinfo.cli import wake
from bootherd.bootinfo.codec import Opcode
from bootherd.boottype import BootType
from bootherd.cli import main
from bootherd.config import build
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory, StateEvent, Writer
from bootherd.inventory.ops import node_events
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.metrics import Metrics
from bootherd.procs import free_port
from bootherd.service import Context, wire

SUBNET = "127.69.0.0/24"


@pytest.fixture
def setup(tmp_path):
    url = f"sqlite:///{tmp_path}/i.db"
    e = make_engine(url)
    upgrade(e)
    import_testbed(e, generate(5, subnet=SUBNET))
    cfg = build({"database": {"url": url},
                 "bootinfo": {"port": free_port(), "order_port": free_port(),
                              "client_port": free_port()},
                 "http": {"port": free_port(), "admin_token_file": str(tmp_path / "token"),
                          "root": str(tmp_path / "www")},
                 "states": {"check_interval": 3600.0}}, base_dir=tmp_path)
    yield e, cfg
    e.dispose()


def _listen(cfg, ip: str) -> socket.socket:
    sk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sk.bind((ip, cfg.bootinfo.client_port))
    sk.settimeout(5)
    return sk


def test_wake_without_server_and_events(setup):
    e, cfg = setup
    sk = _listen(cfg, "127.69.0.3")  # pc2's control IP
    try:
        msg = wake(cfg, "pc2", "reboot", engine=e)
        data, src = sk.recvfrom(2048)
    finally:
        sk.close()
    assert src == ("127.0.0.1", cfg.bootinfo.order_port)
    pkt = codec.decode(data)
    assert (pkt.opcode, pkt.boot_what().type) == (Opcode.ORDER, BootType.REBOOT)
    assert f"from 127.0.0.1:{cfg.bootinfo.order_port}" in msg and "warning" not in msg
    rows = node_events(e, "pc2")
    assert [(r["state"], r["source"]) for r in rows] == [("PXEWAKEUP", "cli")]


def test_wake_errors(setup):
    e, cfg = setup
    with pytest.raises(KeyError):
        wake(cfg, "nosuch", engine=e)
    with pytest.raises(ValueError):
        wake(cfg, "pc1", "PART", engine=e)


async def test_wake_while_server_holds_order_port(setup):
    e, cfg = setup
    live = LiveInventory(e, poll_interval=0.05, write_batch_interval=0.01)
    await live.start()
    ctx = Context(cfg, live, Metrics())
    svc = wire(ctx, ["bootinfo"])
    await svc.start()
    sk = _listen(cfg, "127.69.0.2")  # pc1
    try:
        # Another process would do exactly this; a thread with its own engine is the same.
        msg = await asyncio.to_thread(wake, cfg, "pc1")
        data, src = await asyncio.to_thread(sk.recvfrom, 2048)
        assert src == ("127.0.0.1", cfg.bootinfo.order_port)
        assert codec.decode(data).boot_what().type is BootType.AUTO
        assert "warning" not in msg
    finally:
        sk.close()
        await svc.stop()
        await live.stop()


def _toml(cfg, path) -> str:  # noqa: ANN001
    """The test's configuration as a file the CLI reads."""
    bi, h = cfg.bootinfo, cfg.http
    path.write_text(
        f'[database]\nurl = "{cfg.database.url}"\n'
        f'[bootinfo]\nport = {bi.port}\norder_port = {bi.order_port}\n'
        f'client_port = {bi.client_port}\n'
        f'[http]\nport = {h.port}\nadmin_token_file = "{h.admin_token_file}"\n')
    return str(path)


async def test_cli_wake_goes_through_the_running_server(setup, tmp_path, capsys):
    """With a server running, `bootherd node wake` asks its admin API: the order is the
    coordinator's (its watcher would re-send it), not the CLI's own."""
    e, cfg = setup
    conf = _toml(cfg, tmp_path / "bootherd.toml")
    live = LiveInventory(e, poll_interval=0.05, write_batch_interval=0.01)
    await live.start()
    ctx = Context(cfg, live, Metrics(), server_name="srv")
    svc = wire(ctx, ["bootinfo", "http"])
    await svc.start()
    sk = _listen(cfg, "127.69.0.4")  # pc3
    try:
        rc = await asyncio.to_thread(main, ["node", "wake", "-c", conf, "pc3",
                                            "--order", "RESTART"])
        assert rc == 0
        assert "through the running server" in capsys.readouterr().out
        data, src = await asyncio.to_thread(sk.recvfrom, 2048)
        assert src == ("127.0.0.1", cfg.bootinfo.order_port)
        assert codec.decode(data).boot_what().type is BootType.RESTART
        assert svc.lifecycle.core.life["pc3"].order is BootType.RESTART
        assert ctx.live.state_of("pc3")[0] == "PXEWAKEUP"
        assert await asyncio.to_thread(live.writer.flush)
        assert [(r["state"], r["source"]) for r in node_events(e, "pc3")] == \
            [("PXEWAKEUP", "bootinfo")]  # the server's event, not the CLI's
        assert await asyncio.to_thread(main, ["node", "wake", "-c", conf, "nosuch"]) == 1  # failed
    finally:
        sk.close()
        await svc.stop()
        await live.stop()
    # No server any more: the CLI sends the order itself.
    sk = _listen(cfg, "127.69.0.4")
    try:
        assert await asyncio.to_thread(main, ["node", "wake", "-c", conf, "pc3"]) == 0
        data, _ = await asyncio.to_thread(sk.recvfrom, 2048)
        assert codec.decode(data).boot_what().type is BootType.AUTO
    finally:
        sk.close()
    assert [r["source"] for r in node_events(e, "pc3")] == ["bootinfo", "cli"]


def test_node_events_command_limit_and_order(setup, capsys):
    e, cfg = setup
    with e.begin() as c:
        Writer._write_events(c, [StateEvent("pc3", st, "t", float(i))
                                 for i, st in enumerate(["PXEBOOTING", "BOOTING", "TBSETUP",
                                                         "ISUP"])])
    assert main(["node", "events", "pc3", "--limit", "2", "--json",
                 "--db", cfg.database.url]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["state"], r["ts"]) for r in rows] == [("TBSETUP", 2.0), ("ISUP", 3.0)]
    assert main(["node", "events", "pc3", "--db", cfg.database.url]) == 0
    table = capsys.readouterr().out
    assert table.index("PXEBOOTING") < table.index("ISUP")
