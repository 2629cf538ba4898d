"""The bootinfo server over real UDP sockets on 127.x (nodes' control IPs)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from bootherd.bootinfo import codec
from bootherd.bootinfo.codec import Opcode
from bootherd.boottype import BootType
from bootherd.config import build
from bootherd.inventory import schema as s
from bootherd.inventory.db import make_engine, upgrade
from bootherd.inventory.live import LiveInventory
from bootherd.inventory.ops import allocate
from bootherd.inventory.testbed import generate, import_testbed
from bootherd.metrics import Metrics
from bootherd.service import Context, StartupError, wire
from bootherd.states import State

SUBNET = "127.66.0.0/24"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


class Client:
    """A loader: sends from, and listens on, <node ip>:client_port."""

    def __init__(self, ip: str, port: int, server: tuple[str, int]):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((ip, port))
        self.sock.settimeout(5)
        self.server = server

    def ask(self, raw: bytes | None = None) -> tuple[codec.Packet, tuple]:
        self.sock.sendto(raw or codec.request(), self.server)
        return self.recv()

    def recv(self, timeout: float = 5) -> tuple[codec.Packet, tuple]:
        self.sock.settimeout(timeout)
        data, src = self.sock.recvfrom(2048)
        return codec.decode(data), src

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def engine(tmp_path):
    e = make_engine(f"sqlite:///{tmp_path}/i.db")
    upgrade(e)
    import_testbed(e, generate(20, subnet=SUBNET))
    with e.begin() as c:  # one wide-area node with a key
        c.execute(update(s.nodes).where(s.nodes.c.node_id == "pc2").values(privkey="k-pc2"))
    yield e
    e.dispose()


async def _start(engine, client_port: int | None = None):
    cfg = build({"bootinfo": {"port": free_udp_port(), "order_port": free_udp_port(),
                              "client_port": client_port or free_udp_port()},
                 "states": {"check_interval": 3600.0}})
    live = LiveInventory(engine, poll_interval=0.05, write_batch_interval=0.01)
    await live.start()
    ctx = Context(cfg, live, Metrics())
    wiring = wire(ctx, ["bootinfo"])
    await wiring.start()
    return ctx, wiring


async def _stop(ctx, svc):
    await svc.stop()
    await ctx.live.stop()


@pytest.fixture
async def running(engine):
    ctx, svc = await _start(engine)
    yield ctx, svc
    await _stop(ctx, svc)


def _node(ctx, allocated: bool):
    return next(n for n in sorted(ctx.live.snapshot.nodes.values(), key=lambda n: n.node_id)
                if (n.allocation is not None) == allocated and n.node_id != "pc2")


def _client(ctx, node, port: int | None = None) -> Client:
    bi = ctx.config.bootinfo
    return Client(node.control_ip, port or bi.client_port, (bi.address, bi.port))


async def test_request_from_9696_on_node_ip(engine):
    ctx, svc = await _start(engine, client_port=9696)
    try:
        node = _node(ctx, allocated=True)
        try:
            cl = _client(ctx, node, 9696)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                pytest.skip(f"{node.control_ip}:9696 busy")
            raise
        try:
            pkt, src = await asyncio.to_thread(cl.ask)
        finally:
            cl.close()
        assert src == ("127.0.0.1", ctx.config.bootinfo.port)  # from the listening socket
        assert (pkt.opcode, pkt.status) == (Opcode.REPLY, 0)
        bw = pkt.boot_what()
        assert (bw.type, bw.partition) == (BootType.PART, 1)
        assert ctx.live.state_of(node.node_id)[0] == State.BOOTING
        c = ctx.metrics.protocol("bootinfo")
        assert (c["requests"], c["replies"], c["reply_part"]) == (1, 1, 1)
    finally:
        await _stop(ctx, svc)


async def test_states_recorded_once_per_window(running):
    ctx, _ = running
    node = _node(ctx, allocated=True)
    seen = []
    ctx.live.on_state(lambda ev: seen.append((ev.node_id, ev.state)))
    cl = _client(ctx, node)
    try:
        for _ in range(3):
            pkt, _src = await asyncio.to_thread(cl.ask)
            assert pkt.boot_what().type is BootType.PART
    finally:
        cl.close()
    assert seen == [(node.node_id, State.PXEBOOTING), (node.node_id, State.BOOTING)]


async def test_malformed_counted_and_dropped(running):
    ctx, _ = running
    bi = ctx.config.bootinfo
    node = _node(ctx, allocated=True)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk:
        for raw in (b"", b"x", bytes(519), bytes(521), b"\xff" * 1400):
            junk.sendto(raw, (bi.address, bi.port))
        # Well-sized but not a question: ignored, not answered.
        junk.sendto(codec.reply(codec.BootWhat(BootType.WAIT)), (bi.address, bi.port))
    cl = _client(ctx, node)
    try:
        pkt, _ = await asyncio.to_thread(cl.ask)
        assert pkt.boot_what().type is BootType.PART
    finally:
        cl.close()
    c = ctx.metrics.protocol("bootinfo")
    assert c["malformed"] == 5 and c["ignored"] == 1 and c["replies"] == 1


async def test_keyed_request(running):
    ctx, _ = running
    cl = Client("127.0.0.1", ctx.config.bootinfo.client_port,
                (ctx.config.bootinfo.address, ctx.config.bootinfo.port))
    try:
        pkt, _ = await asyncio.to_thread(cl.ask, codec.keyed_request("k-pc2"))
        # pc2 is allocated or not: either way the key found the node, not a new node.
        assert pkt.boot_what().type in (BootType.PART, BootType.WAIT)
        assert ctx.live.state_of("pc2") is not None
        cl.sock.sendto(codec.keyed_request("wrong"), cl.server)
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(cl.recv, 0.3)
    finally:
        cl.close()
    assert ctx.metrics.protocol("bootinfo")["unknown_key"] == 1


async def test_unknown_address_gets_newnode_mfs(running):
    ctx, _ = running
    bi = ctx.config.bootinfo
    cl = Client("127.66.1.250", bi.client_port, (bi.address, bi.port))
    try:
        pkt, _ = await asyncio.to_thread(cl.ask)
    finally:
        cl.close()
    bw = pkt.boot_what()
    assert (bw.type, bw.mfs) == (BootType.MFS, "127.0.0.1:/tftpboot/newnode")


async def test_one_shot_next_os_served_once_then_cleared(engine):
    with engine.begin() as c:
        c.execute(update(s.nodes).where(s.nodes.c.node_id == "pc1").values(next_os="FRISBEE-MFS"))
    ctx, svc = await _start(engine)
    try:
        node = ctx.live.snapshot.nodes["pc1"]
        if node.allocation is None:
            ops = pytest.importorskip("bootherd.inventory.ops")
            exp = next(iter(ctx.live.snapshot.experiments))
            await asyncio.to_thread(ops.allocate, engine, exp[0], exp[1], "pc1", "oneshot")
            await _until(lambda: ctx.live.snapshot.nodes["pc1"].allocation is not None)
            node = ctx.live.snapshot.nodes["pc1"]
        cl = _client(ctx, node)
        try:
            first, _ = await asyncio.to_thread(cl.ask)
            second, _ = await asyncio.to_thread(cl.ask)  # before the snapshot caught up
        finally:
            cl.close()
        assert first.boot_what().type is BootType.MFS
        assert first.boot_what().cmdline == "console=ttyS0"
        assert second.boot_what().type is BootType.PART
        await svc.lifecycle.drain()
        with engine.connect() as c:
            assert c.execute(select(s.nodes.c.next_os)
                             .where(s.nodes.c.node_id == "pc1")).scalar() is None
        await _until(lambda: ctx.live.snapshot.nodes["pc1"].next_os is None)
        assert not any(life.consumed for life in svc.lifecycle.core.life.values())
    finally:
        await _stop(ctx, svc)


async def _until(cond, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def _allocate_elsewhere(db_url: str, pid: str, eid: str, node_id: str) -> None:
    """What `bootherd node allocate` does, from its own engine and thread."""
    eng = make_engine(db_url)
    try:
        allocate(eng, pid, eid, node_id, "woken")
    finally:
        eng.dispose()


async def test_wait_then_allocated_then_order_then_boot(engine):
    ctx, svc = await _start(engine)
    try:
        bi = ctx.config.bootinfo
        node = _node(ctx, allocated=False)
        cl = _client(ctx, node)
        try:
            pkt, _ = await asyncio.to_thread(cl.ask)
            assert pkt.boot_what().type is BootType.WAIT
            assert ctx.live.state_of(node.node_id)[0] == State.PXEWAIT
            pid, eid = next(iter(ctx.live.snapshot.experiments))
            t = threading.Thread(target=_allocate_elsewhere,
                                 args=(str(engine.url), pid, eid, node.node_id))
            t.start()
            order, src = await asyncio.to_thread(cl.recv, 10)
            t.join()
            assert src == (bi.address, bi.order_port)
            assert (order.opcode, order.status) == (Opcode.ORDER, 0)
            assert order.boot_what().type is BootType.AUTO
            assert ctx.live.state_of(node.node_id)[0] == State.PXEWAKEUP
            pkt, _ = await asyncio.to_thread(cl.ask)
            assert pkt.boot_what().type is BootType.PART
            assert ctx.live.state_of(node.node_id)[0] == State.BOOTING
        finally:
            cl.close()
        assert ctx.metrics.protocol("lifecycle")["auto_wakeups"] == 1
    finally:
        await _stop(ctx, svc)


async def test_send_order_kinds(running):
    ctx, svc = running
    lc = svc.lifecycle
    node = _node(ctx, allocated=True)
    cl = _client(ctx, node)
    try:
        res = await lc.order(node.node_id, "reboot")  # names work too (admin API)
        assert res == f"sent REBOOT order to {node.control_ip}:{ctx.config.bootinfo.client_port}"
        pkt, src = await asyncio.to_thread(cl.recv)
        assert src[1] == ctx.config.bootinfo.order_port
        assert (pkt.opcode, pkt.boot_what().type) == (Opcode.ORDER, BootType.REBOOT)
        with pytest.raises(ValueError):
            await lc.order(node.node_id, BootType.PART)
        with pytest.raises(ValueError):
            await lc.order(node.node_id, "BOGUS")
        with pytest.raises(KeyError):
            await lc.order("nosuchnode")
    finally:
        cl.close()


async def test_port_in_use_raises_oserror_naming_address(engine):
    ctx, svc = await _start(engine)
    try:
        live2 = LiveInventory(engine)
        ctx2 = Context(ctx.config, live2, Metrics())
        with pytest.raises(StartupError, match=f"127.0.0.1:{ctx.config.bootinfo.port}"):
            await wire(ctx2, ["bootinfo"]).start()
        await asyncio.to_thread(live2.writer.close)
    finally:
        await _stop(ctx, svc)


async def test_live_fuzz_server_keeps_answering(running):
    ctx, _ = running
    bi = ctx.config.bootinfo
    node = _node(ctx, allocated=True)
    cl = _client(ctx, node)
    junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    junk.bind(("127.66.2.1", 0))  # not a node; answers (if any) go to an unbound port

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.one_of(
        st.binary(max_size=700),
        st.binary(min_size=512, max_size=512).flatmap(
            lambda d: st.tuples(st.integers(-32768, 32767), st.integers(-32768, 32767))
            .map(lambda vo: vo[0].to_bytes(2, "little", signed=True)
                 + vo[1].to_bytes(2, "little", signed=True) + b"\0\0\0\0" + d))))
    def fuzz(raw: bytes) -> None:
        junk.sendto(raw, (bi.address, bi.port))
        pkt, _ = cl.ask()
        assert pkt.opcode == Opcode.REPLY and pkt.boot_what().type is BootType.PART

    try:
        await asyncio.to_thread(fuzz)
    finally:
        cl.close()
        junk.close()
    assert ctx.metrics.protocol("bootinfo")["errors"] == 0


async def test_listening_socket_sized_for_a_storm_and_its_drops_exported(running):
    """bootinfo.rcvbuf asked (whole as root, SO_RCVBUFFORCE); the kernel's drop count of
    the socket is the event socket_drops of bootinfo (a count that only grows)."""
    ctx, wiring = running
    server = wiring.services["bootinfo"].server
    sock = server.sock
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if os.geteuid() == 0:
        assert got >= ctx.config.bootinfo.rcvbuf
    assert ctx.metrics._counts[("bootinfo", "socket_drops")]() == 0


async def test_a_backlog_is_answered_whole_and_a_retransmission_once(running):
    """A storm's synthetic backlog: while the event loop is busy, 20 loaders ask and each
    asks twice more (its 1 s and 2 s retransmissions).  When the loop gets to them, all
    60 datagrams are read in one batch; each loader gets exactly one answer, and the
    repeats are counted, not answered."""
    ctx, _ = running
    nodes = sorted(ctx.live.snapshot.nodes.values(), key=lambda n: n.node_id)
    clients = [_client(ctx, n) for n in nodes if n.node_id != "pc2"]
    try:
        for _ in range(3):  # the loop is blocked meanwhile: nothing is read yet
            for cl in clients:
                cl.sock.sendto(codec.request(), cl.server)
        for cl in clients:
            pkt, _src = await asyncio.to_thread(cl.recv)
            assert pkt.opcode == Opcode.REPLY
        await asyncio.sleep(0.2)  # a second answer, if any, has arrived by now
        for cl in clients:
            cl.sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                cl.sock.recv(2048)
    finally:
        for cl in clients:
            cl.close()
    c = ctx.metrics.protocol("bootinfo")
    assert c["replies"] == len(clients) and c["duplicates_queued"] == 2 * len(clients)
