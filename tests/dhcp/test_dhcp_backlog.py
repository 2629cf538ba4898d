"""Started work first, on a live server with a synthetic backlog (dhcp/priority.py rules).

The server's event loop is held while datagrams pile up in its socket's receive queue, as
they do when a power-on burst arrives faster than they are decided; then it is let go and
the order in which the engine decides them is recorded."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))
from test_dhcp_server import PXE_BIOS, SERVER, SID, request, start_env  # noqa: E402

from bootherd.dhcp import priority  # noqa: E402
from bootherd.dhcp.codec import decode  # noqa: E402


def test_classify_by_message_type():
    mac = bytes(range(6))
    d = request(mac, 1, xid=5)
    r = request(mac, 3, xid=5, opts={54: socket.inet_aton(SERVER)})
    rel = request(mac, 7, xid=5)
    assert priority.classify(d, ("h", 1))[1] == priority.DISCOVER
    assert priority.classify(r, ("h", 1))[1] == priority.REQUEST
    assert priority.classify(rel, ("h", 1))[1] == priority.OTHER
    # Same client, same transaction, same type: one key; another xid is another request.
    assert priority.classify(d, ("h", 1))[0] == priority.classify(d, ("h", 2))[0]
    assert priority.classify(d, ("h", 1))[0] != priority.classify(request(mac, 1, xid=6),
                                                                   ("h", 1))[0]
    assert priority.classify(d, ("h", 1))[0] != priority.classify(r, ("h", 1))[0]
    assert priority.classify(b"junk", ("h", 1))[1] == priority.OTHER


@given(st.binary(max_size=600))
def test_classify_never_raises(data):
    key, cls = priority.classify(data, ("h", 1))
    hash(key)
    assert cls in (priority.REQUEST, priority.OTHER, priority.DISCOVER)


async def test_requests_first_repeats_once_stale_discovers_dropped(tmp_path: Any) -> None:
    env, ctx = await start_env(tmp_path, unknown_clients="pool",
                               dynamic_pool="127.21.1.10-127.21.1.250",
                               discover_deadline=0.3)
    server = env.svc.server
    decided: list[tuple[int, bytes]] = []
    on_packet = server.on_packet

    def record(data, addr, proto, proxy, pktinfo=None):  # noqa: ANN001
        m = decode(data)
        decided.append((m.message_type, m.chaddr[:6]))
        on_packet(data, addr, proto, proxy, pktinfo)

    server.on_packet = record
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.21.0.200", 0))
    c.settimeout(2.0)
    dest = (SERVER, env.port)
    try:
        macs = [bytes([2, 0, 0, 0, 0, i]) for i in range(8)]
        offers = {}
        for i in range(4):  # four clients holding an offer
            c.sendto(request(macs[i], 1, xid=100 + i, opts=PXE_BIOS), dest)
            await asyncio.sleep(0)
            offers[i] = decode(await asyncio.get_running_loop().run_in_executor(
                None, c.recv, 2048))
        decided.clear()
        # The loop is held from here on (no await): everything waits in the socket's queue.
        for i in (4, 5):
            c.sendto(request(macs[i], 1, xid=100 + i, opts=PXE_BIOS), dest)
        time.sleep(0.5)  # those two DISCOVERs are now older than the deadline
        c.sendto(request(macs[6], 1, xid=106, opts=PXE_BIOS), dest)
        for i in range(4):
            c.sendto(request(macs[i], 3, xid=100 + i,
                             opts={**PXE_BIOS, **SID, 50: offers[i].yiaddr}), dest)
        c.sendto(request(macs[0], 3, xid=100, opts={**PXE_BIOS, **SID, 50: offers[0].yiaddr}),
                 dest)  # the firmware's retransmission, still waiting: answered once
        c.sendto(request(macs[6], 1, xid=106, opts=PXE_BIOS), dest)
        replies = []
        c.settimeout(0.05)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and len(replies) < 5:
            await asyncio.sleep(0.05)
            try:
                while True:
                    replies.append(decode(c.recv(2048)))
            except (TimeoutError, BlockingIOError):
                pass
        await asyncio.sleep(0.3)  # nothing more comes
        try:
            while True:
                replies.append(decode(c.recv(2048)))
        except (TimeoutError, BlockingIOError):
            pass
        # The kernel dropped nothing (the socket's queue had room), and /metrics says so.
        assert ctx.metrics._counts[("dhcp", "socket_drops")]() == 0
        assert ctx.metrics._gauges["dhcp_backlog"]() == 0
    finally:
        c.close()
        await env.svc.stop()
        await env.live.stop()
    # Decided: the REQUESTs (oldest first), then the fresh DISCOVER; the stale ones never.
    assert decided == [(3, macs[i]) for i in range(4)] + [(1, macs[6])]
    got = sorted((m.message_type, m.chaddr[:6]) for m in replies)
    assert got == sorted([(5, macs[i]) for i in range(4)] + [(2, macs[6])])
    assert env.counters["stale_discover"] == 2
    assert env.counters["duplicates_queued"] == 2


async def test_a_retransmission_renews_a_discover_still_waiting(tmp_path: Any) -> None:
    """A DISCOVER still waiting when the firmware retransmits it (same xid) is answered
    once, not dropped as stale together with its copy: the copy renews it."""
    env, _ctx = await start_env(tmp_path, unknown_clients="pool",
                                dynamic_pool="127.21.1.10-127.21.1.250",
                                discover_deadline=0.3)
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.21.0.201", 0))
    dest = (SERVER, env.port)
    mac = bytes([2, 0, 0, 0, 1, 1])
    try:
        # The loop is held from here on (no await): both copies wait in the socket.
        c.sendto(request(mac, 1, xid=77, opts=PXE_BIOS), dest)
        time.sleep(0.5)  # the first copy is now older than the deadline
        c.sendto(request(mac, 1, xid=77, opts=PXE_BIOS), dest)
        c.settimeout(3.0)
        offer = decode(await asyncio.get_running_loop().run_in_executor(None, c.recv, 2048))
        assert offer.message_type == 2 and offer.xid == 77
        c.settimeout(0.3)
        try:
            extra = c.recv(2048)
        except TimeoutError:
            extra = None
        assert extra is None  # answered once
    finally:
        c.close()
        await env.svc.stop()
        await env.live.stop()
    assert env.counters["stale_discover"] == 0
    assert env.counters["duplicates_queued"] == 1
