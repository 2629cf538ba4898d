"""Started work first, on a live server with a synthetic backlog (tmcd/priority.py rules).

The event loop is held while the native front accepts and reads requests on its own
thread, as it does when a power-on storm arrives faster than they are decided; then the
loop is let go and the order in which the server decides them is recorded."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from conftest import make_env

from bootherd.inventory.memory import snapshot_from_text
from bootherd.inventory.testbed import generate
from bootherd.tmcd import front, priority


def test_classify_by_node_state():
    snap = snapshot_from_text(generate(4, subnet="127.31.0.0/24"))
    a, b = sorted(snap.nodes.values(), key=lambda n: n.node_id)[:2]
    states = {a.node_id: "TBSETUP", b.node_id: "BOOTING"}
    key, cls = priority.classify(a.control_ip, b"state ISUP\n", snap, states.get)
    assert cls == priority.STARTED and key == (a.control_ip, b"state ISUP\n")
    assert priority.classify(b.control_ip, b"status\n", snap, states.get)[1] == priority.NEW
    assert priority.classify("127.99.0.1", b"status\n", snap, states.get)[1] == priority.NEW
    assert priority.classify(a.control_ip, b"x", snap, None)[1] == priority.NEW
    assert priority.classify(a.control_ip, b"status\n", snap, states.get)[0] != key
    # An IPv4-mapped address is the same node.
    assert priority.classify(f"::ffff:{a.control_ip}", b"status\n", snap, states.get)[1] == \
        priority.STARTED


def _send(ip: str, port: int, line: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), source_address=(ip, 0))
    s.sendall(line)
    s.shutdown(socket.SHUT_WR)
    return s


def _read(s: socket.socket) -> bytes:
    s.settimeout(5.0)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return out


async def test_node_in_tbsetup_first_repeat_decided_once(tmp_path) -> None:  # noqa: ANN001
    if not front.available:
        pytest.skip("bootherd._tmcdfront not built")
    env = await make_env(tmp_path)
    try:
        a, b, c = env.allocated()[:3]
        env.live.record_state(a.node_id, "TBSETUP", "test")
        server = env.service.server
        decided: list[tuple[str, bytes]] = []
        process = server.process

        def record(data, peer_ip, udp, reply=None, tls=False, cert_cn=None):  # noqa: ANN001, ANN202
            decided.append((peer_ip, data))
            return process(data, peer_ip, udp, reply, tls, cert_cn)

        server.process = record
        # The loop is held from here on (no await): the front thread accepts and reads.
        socks = [_send(b.control_ip, env.port, b"VERSION=40 status\n"),
                 _send(c.control_ip, env.port, b"VERSION=40 status\n")]
        time.sleep(0.05)
        socks += [_send(a.control_ip, env.port, b"VERSION=40 state ISUP\n"),
                  _send(a.control_ip, env.port, b"VERSION=40 state ISUP\n")]
        time.sleep(0.3)
        replies = await asyncio.gather(*(asyncio.to_thread(_read, s) for s in socks))
    finally:
        await env.service.stop()
        await env.live.stop()
    assert decided == [(a.control_ip, b"VERSION=40 state ISUP\n"),
                       (b.control_ip, b"VERSION=40 status\n"),
                       (c.control_ip, b"VERSION=40 status\n")]
    assert replies[0].startswith(b"ALLOCATED=") and replies[1].startswith(b"ALLOCATED=")
    assert replies[2] == replies[3] == b""  # both connections got the state's (empty) reply
    assert env.counters["duplicates_queued"] == 1
    assert env.live.state_of(a.node_id)[0] == "ISUP"
