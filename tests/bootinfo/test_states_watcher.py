"""Node state machine: transitions, dedupe, and the watcher of stuck nodes."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bootherd.bootinfo import codec
from bootherd.bootinfo.codec import Opcode
from bootherd.bootinfo.service import create_service
from bootherd.config import build
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.metrics import Metrics
from bootherd.policy import BootType
from bootherd.service import Context
from bootherd.states import BootStateRecorder, State, Watcher, allowed, reply_state

SUBNET = "127.68.0.0/24"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def test_transitions():
    assert allowed(None, State.BOOTING)
    assert allowed(State.ISUP, State.PXEBOOTING)  # a power cycle can happen any time
    assert allowed(State.PXEBOOTING, State.PXEWAIT)
    assert allowed(State.PXEWAIT, State.PXEWAKEUP)
    assert allowed(State.PXEWAKEUP, State.PXEFAILED)
    assert allowed(State.BOOTING, State.TBSETUP) and allowed(State.TBSETUP, State.ISUP)
    assert not allowed(State.PXEWAIT, State.ISUP)
    assert not allowed(State.ISUP, State.PXEWAKEUP)
    assert not allowed("NONSENSE", State.ISUP)


def test_reply_states():
    assert reply_state(BootType.WAIT) is State.PXEWAIT
    assert reply_state(BootType.REBOOT) is State.REBOOTING
    for t in (BootType.PART, BootType.MB, BootType.MFS, BootType.SYSID, BootType.DISKPART):
        assert reply_state(t) is State.BOOTING


class FakeLive:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.states: dict[str, tuple[str, float]] = {}

    def record_state(self, node_id, state, source, detail=""):  # noqa: ANN001, ANN201
        self.events.append((node_id, state))
        self.states[node_id] = (state, 0.0)

    def state_of(self, node_id):  # noqa: ANN001, ANN201
        return self.states.get(node_id)


def test_recorder_window_with_injected_clock():
    now = [100.0]
    live = FakeLive()
    r = BootStateRecorder(live, "bootinfo", window=10, clock=lambda: now[0])
    assert r.answered("pc1", "10.0.0.1", State.BOOTING)
    now[0] = 105
    assert not r.answered("pc1", "10.0.0.1", State.BOOTING)  # a retry
    assert r.answered("pc1", "10.0.0.1", State.PXEWAIT)      # the answer changed
    live.states["pc1"] = (State.PXEWAKEUP, 0.0)               # woken meanwhile
    now[0] = 106
    assert r.answered("pc1", "10.0.0.1", State.PXEWAIT)
    now[0] = 117
    assert r.answered("pc1", "10.0.0.1", State.PXEWAIT)      # window over
    assert live.events.count(("pc1", State.PXEBOOTING)) == 4


@pytest.fixture
async def running(tmp_path):
    e = make_engine(f"sqlite:///{tmp_path}/i.db")
    upgrade(e)
    import_testbed(e, generate(10, subnet=SUBNET))
    cfg = build({"bootinfo": {"port": free_udp_port(), "order_port": free_udp_port(),
                              "client_port": free_udp_port()},
                 "states": {"check_interval": 3600.0, "pxewakeup_timeout": 20.0,
                            "pxewakeup_retries": 2, "booting_timeout": 600.0}})
    live = LiveInventory(e, poll_interval=0.05, write_batch_interval=0.01)
    await live.start()
    ctx = Context(cfg, live, Metrics())
    svc = create_service(ctx)
    await svc.start()
    yield ctx
    await svc.stop()
    await live.stop()
    e.dispose()


async def test_service_starts_one_watcher(running):
    ctx = running
    assert isinstance(ctx.shared["states_watcher"], Watcher)
    assert ctx.shared["states_watcher"]._task is not None


async def test_stuck_in_pxewakeup_resent_then_failed(running):
    ctx = running
    server = ctx.shared["bootinfo"]
    bi = ctx.config.bootinfo
    node = sorted(ctx.live.snapshot.nodes.values(), key=lambda n: n.node_id)[0]
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
    watcher = Watcher(ctx, clock=lambda: now[0])
    try:
        await server.send_order(nid, BootType.REBOOT)
        assert (await asyncio.to_thread(recv_order)).boot_what().type is BootType.REBOOT
        since = ctx.live.state_of(nid)[1]

        now[0] = since + 5  # not yet stuck
        assert await watcher.check_once() == []

        for attempt in (1, 2):
            now[0] = ctx.live.state_of(nid)[1] + 21
            assert await watcher.check_once() == [(nid, "resend")]
            pkt = await asyncio.to_thread(recv_order)
            assert pkt.boot_what().type is BootType.REBOOT  # the same order again
            assert ctx.live.state_of(nid)[0] == State.PXEWAKEUP
            assert watcher.retries[nid] == attempt

        now[0] = ctx.live.state_of(nid)[1] + 21
        assert await watcher.check_once() == [(nid, "failed")]
        assert ctx.live.state_of(nid)[0] == State.PXEFAILED
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recvfrom(2048)  # no fourth order
        assert await watcher.check_once() == []
    finally:
        sock.close()
    assert ctx.metrics.protocol("bootinfo")["orders"] == 3


async def test_answer_resets_retry_budget(running):
    ctx = running
    nid = sorted(ctx.live.snapshot.nodes)[1]
    now = [0.0]
    watcher = Watcher(ctx, clock=lambda: now[0])
    await ctx.shared["bootinfo"].send_order(nid)
    now[0] = ctx.live.state_of(nid)[1] + 21
    assert await watcher.check_once() == [(nid, "resend")]
    ctx.live.record_state(nid, State.PXEBOOTING, "bootinfo")  # the node asked again
    assert nid not in watcher.retries


async def test_booting_too_long_fails(running):
    ctx = running
    a, b = sorted(ctx.live.snapshot.nodes)[2:4]
    ctx.live.record_state(a, State.BOOTING, "bootinfo", ts=1000.0)
    ctx.live.record_state(b, State.TBSETUP, "tmcd", ts=1500.0)
    watcher = Watcher(ctx, clock=lambda: 1000.0 + 700)
    assert await watcher.check_once() == [(a, "failed")]
    assert ctx.live.state_of(a)[0] == State.BOOTFAILED
    assert ctx.live.state_of(b)[0] == State.TBSETUP


async def test_watcher_loop_runs(tmp_path):
    e = make_engine(f"sqlite:///{tmp_path}/i.db")
    upgrade(e)
    import_testbed(e, generate(3, subnet=SUBNET))
    live = LiveInventory(e)
    cfg = build({"states": {"check_interval": 0.01, "booting_timeout": 1.0}})
    ctx = Context(cfg, live, Metrics())
    live.record_state("pc1", State.BOOTING, "test", ts=10.0)
    w = Watcher(ctx, clock=lambda: 20.0)
    await w.start()
    try:
        for _ in range(500):
            if live.state_of("pc1")[0] == State.BOOTFAILED:
                break
            await asyncio.sleep(0.01)
        assert live.state_of("pc1")[0] == State.BOOTFAILED
    finally:
        await w.stop()
        await asyncio.to_thread(live.writer.close)
        e.dispose()
