"""`bootherd node wake` (bootherd.bootinfo.cli) and `bootherd node events`."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from bootherd.bootinfo import codec
from bootherd.bootinfo.cli import wake
from bootherd.bootinfo.codec import Opcode
from bootherd.bootinfo.service import create_service
from bootherd.cli import main
from bootherd.config import build
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory, StateEvent, Writer
from bootherd.inventory.ops import node_events
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.metrics import Metrics
from bootherd.policy import BootType
from bootherd.service import Context

SUBNET = "127.69.0.0/24"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


@pytest.fixture
def setup(tmp_path):
    url = f"sqlite:///{tmp_path}/i.db"
    e = make_engine(url)
    upgrade(e)
    import_testbed(e, generate(5, subnet=SUBNET))
    cfg = build({"database": {"url": url},
                 "bootinfo": {"port": free_udp_port(), "order_port": free_udp_port(),
                              "client_port": free_udp_port()},
                 "states": {"check_interval": 3600.0}})
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
    svc = create_service(ctx)
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
