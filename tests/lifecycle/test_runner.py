"""The lifecycle runner around the coordinator: real UDP orders from the bootinfo
transport, the watcher's pass confirmed against a real inventory, memory that
survives a restart.  (The rules themselves: test_coordinator.py.)"""

from __future__ import annotations

import asyncio
import socket

import pytest

from bootherd.bootinfo import codec
from bootherd.bootinfo.codec import Opcode
from bootherd.boottype import BootType
from bootherd.config import build
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.lifecycle import Lifecycle, Via
from bootherd.metrics import Metrics
from bootherd.procs import free_port
from bootherd.service import Context, wire
from bootherd.states import State

SUBNET = "127.68.0.0/24"


@pytest.fixture
def engine(tmp_path):
    e = make_engine(f"sqlite:///{tmp_path}/i.db")
    upgrade(e)
    import_testbed(e, generate(10, subnet=SUBNET))
    yield e
    e.dispose()


@pytest.fixture
def cfg():
    return build({"bootinfo": {"port": free_port(), "order_port": free_port(),
                               "client_port": free_port()},
                  "states": {"check_interval": 3600.0, "pxewakeup_timeout": 20.0,
                             "pxewakeup_retries": 2, "booting_timeout": 600.0}})


@pytest.fixture
async def running(engine, cfg):
    live = LiveInventory(engine, poll_interval=0.05, write_batch_interval=0.01,
                         server_name="me")
    await live.start()
    w = wire(Context(cfg, live, Metrics(), server_name="me"), ["bootinfo"])
    await w.start()
    yield w
    await w.stop()
    await live.stop()


async def test_stuck_in_pxewakeup_resent_then_failed(running):
    w = running
    lc, live = w.lifecycle, w.ctx.live
    bi = w.ctx.config.bootinfo
    node = sorted(live.snapshot.nodes.values(), key=lambda n: n.node_id)[0]
    nid = node.node_id
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((node.control_ip, bi.client_port))
    sock.settimeout(5)

    def recv_order() -> codec.Packet:
        data, src = sock.recvfrom(2048)
        assert src == (bi.address, bi.order_port)
        pkt = codec.decode(data)
        assert pkt.opcode == Opcode.ORDER
        return pkt

    now = [0.0]
    lc.clock = lambda: now[0]
    try:
        await lc.order(nid, BootType.REBOOT)
        assert (await asyncio.to_thread(recv_order)).boot_what().type is BootType.REBOOT
        since = live.state_of(nid)[1]

        now[0] = since + 5  # not yet stuck
        assert await lc.check_once() == []

        for attempt in (1, 2):
            now[0] = live.state_of(nid)[1] + 21
            assert await lc.check_once() == [(nid, "resend")]
            pkt = await asyncio.to_thread(recv_order)
            assert pkt.boot_what().type is BootType.REBOOT  # the same order again
            assert live.state_of(nid)[0] == State.PXEWAKEUP
            assert lc.core.life[nid].tries == attempt

        now[0] = live.state_of(nid)[1] + 21
        assert await lc.check_once() == [(nid, "failed")]
        assert live.state_of(nid)[0] == State.PXEFAILED
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recvfrom(2048)  # no fourth order
        assert await lc.check_once() == []
    finally:
        sock.close()
    assert w.ctx.metrics.protocol("bootinfo")["orders"] == 3
    assert w.ctx.metrics.protocol("lifecycle")["resends"] == 2


async def test_booting_too_long_fails_after_the_inventory_confirms(running):
    w = running
    lc, live = w.lifecycle, w.ctx.live
    a, b = sorted(live.snapshot.nodes)[2:4]
    lc.execute(lc.core.record(a, State.BOOTING, "bootinfo", "", 1000.0))
    lc.execute(lc.core.record(b, State.TBSETUP, "tmcd", "", 1500.0))
    lc.clock = lambda: 1000.0 + 700
    assert await lc.check_once() == [(a, "failed")]
    assert live.state_of(a)[0] == State.BOOTFAILED
    assert live.state_of(b)[0] == State.TBSETUP


async def test_a_newer_state_in_the_inventory_is_taken_in_not_failed(running, engine):
    """Another server recorded the node since (its row in node_states is newer)."""
    w = running
    lc, live = w.lifecycle, w.ctx.live
    nid = sorted(live.snapshot.nodes)[4]
    lc.execute(lc.core.record(nid, State.BOOTING, "bootinfo", "", 1000.0))
    other = LiveInventory(engine, write_batch_interval=0.01, server_name="other")
    try:
        other.record_state(nid, State.ISUP, "tmcd", ts=1600.0)
        assert await asyncio.to_thread(other.writer.flush)
    finally:
        await asyncio.to_thread(other.writer.close)
    assert await asyncio.to_thread(live.writer.flush)
    lc.clock = lambda: 1000.0 + 700
    assert await lc.check_once() == []
    assert live.state_of(nid) == (State.ISUP, 1600.0)


async def test_memory_survives_a_restart(engine, cfg):
    """Told WAIT and an order's re-sends are in the inventory: a new process knows them."""
    from bootherd.inventory.ops import free as free_node

    free_node(engine, "pc5")
    live = LiveInventory(engine, write_batch_interval=0.01, server_name="me")
    lc = Lifecycle(cfg, live, Metrics(), "me")
    snap = live.snapshot
    free = snap.nodes["pc5"]
    lc.boot_question(snap, free, Via.BOOTINFO)
    lc.execute(lc.core.config_seen("pc1", "d1", 5.0, fetched=True))
    assert await asyncio.to_thread(live.writer.flush)
    await asyncio.to_thread(live.writer.close)

    live2 = LiveInventory(engine, write_batch_interval=0.01, server_name="me")
    lc2 = Lifecycle(cfg, live2, Metrics(), "me")
    await lc2.start()
    try:
        assert lc2.core.waiting == {free.node_id: Via.BOOTINFO}
        assert lc2.core.config_outdated("pc1", "d2") and not lc2.core.config_outdated("pc1", "d1")
    finally:
        await lc2.stop()
        await asyncio.to_thread(live2.writer.close)


async def test_watcher_loop_runs(engine):
    live = LiveInventory(engine)
    cfg = build({"states": {"check_interval": 0.01, "booting_timeout": 1.0}})
    lc = Lifecycle(cfg, live, Metrics(), "me", clock=lambda: 20.0)
    lc.execute(lc.core.record("pc1", State.BOOTING, "test", "", 10.0))
    await lc.start()
    try:
        for _ in range(500):
            if live.state_of("pc1")[0] == State.BOOTFAILED:
                break
            await asyncio.sleep(0.01)
        assert live.state_of("pc1")[0] == State.BOOTFAILED
    finally:
        await lc.stop()
        await asyncio.to_thread(live.writer.close)


async def test_a_late_loader_fetch_is_history_and_never_rewinds_the_state(running, engine):
    """A TFTP transfer is reported when it ends; by then the node may have gone on with
    another server.  The fetch goes into the node's events, not into its state."""
    from sqlalchemy import select

    from bootherd.inventory import schema as s
    from bootherd.inventory.ops import node_events

    w = running
    lc, live = w.lifecycle, w.ctx.live
    nid = sorted(live.snapshot.nodes)[5]
    lc.dhcp_acked(nid)  # this server saw the node start (PXEBOOTING)
    other = LiveInventory(engine, write_batch_interval=0.01, server_name="other")
    try:
        other.record_state(nid, State.ISUP, "tmcd")  # it booted through the other server
        assert await asyncio.to_thread(other.writer.flush)
    finally:
        await asyncio.to_thread(other.writer.close)
    lc.loader_fetched(nid, "/tftpboot/pxeboot.emu", 4096)
    assert await asyncio.to_thread(live.writer.flush)
    assert live.state_of(nid)[0] == State.PXEBOOTING  # this server's view, unchanged
    with engine.connect() as c:
        assert c.execute(select(s.node_states.c.state)
                         .where(s.node_states.c.node_id == nid)).scalar() == State.ISUP
    assert [(e["source"], e["detail"]) for e in node_events(engine, nid)][-1] == \
        ("tftp", "loaded pxeboot.emu (4096 bytes)")
