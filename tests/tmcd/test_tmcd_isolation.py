"""A node never gets another node's data; secrets never travel over UDP; limits hold."""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import ask

from bootherd.tmcd.protocol import split_fullconfig


@pytest.fixture
def env(both_transports):  # noqa: ANN001, ANN201 - these run on both transports
    return both_transports


def _host(env):  # noqa: ANN001, ANN202
    return next(n for n in env.snap.nodes.values() if env.snap.vnodes.get(n.node_id))


def _other_host_node(env, host):  # noqa: ANN001, ANN202
    return next(n for n in env.allocated() if n.node_id != host.node_id and n.control_ip
                and not n.phys_node_id)


async def test_vnodeid_of_own_vnode_works(env) -> None:  # noqa: ANN001
    host = _host(env)
    vid = env.snap.vnodes[host.node_id][0]
    out = await ask(env.port, f"VERSION=40 VNODEID={vid} status ", host.control_ip)
    assert out == b"ALLOCATED=proj0/exp0 NICKNAME=vm0\n"
    out = await ask(env.port, f"VERSION=40 PROXYFOR={vid} status ", host.control_ip)
    assert out == b"ALLOCATED=proj0/exp0 NICKNAME=vm0\n"


async def test_vnodeid_of_another_host_gets_nothing(env) -> None:  # noqa: ANN001
    host = _host(env)
    other = _other_host_node(env, host)
    vid = env.snap.vnodes[host.node_id][0]
    for opt in ("VNODEID", "PROXYFOR"):
        for cmd in ("status", "accounts", "fullconfig"):
            assert await ask(env.port, f"VERSION=40 {opt}={vid} {cmd} ", other.control_ip) == b""
        # Naming a physical node (not a vnode) gets nothing either.
        assert await ask(env.port, f"VERSION=40 {opt}={host.node_id} status ",
                         other.control_ip) == b""
    # Mismatched VNODEID/PROXYFOR, even from the right host.
    v0, v1 = env.snap.vnodes[host.node_id]
    assert await ask(env.port, f"VERSION=40 VNODEID={v0} PROXYFOR={v1} status ",
                     host.control_ip) == b""
    assert env.counters["vnode_refused"] >= 7


async def test_redirect_only_from_loopback_self(env) -> None:  # noqa: ANN001
    host = _host(env)
    other = _other_host_node(env, host)
    line = f"VERSION=40 REDIRECT={host.control_ip} status "
    # From another node's 127.x address: refused.
    assert await ask(env.port, line, other.control_ip) == b""
    # From 127.0.0.2 (in 127/8 but not the server itself): refused.
    assert await ask(env.port, line, "127.0.0.2") == b""
    assert env.counters["redirect_refused"] == 2
    # From 127.0.0.1 exactly: honoured.
    assert await ask(env.port, line, "127.0.0.1") == b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"


async def test_unknown_source_gets_nothing(env) -> None:  # noqa: ANN001
    for src in ("127.0.0.1", "127.0.0.3", "127.77.0.250"):
        for cmd in ("status", "accounts", "fullconfig", "isalive"):
            assert await ask(env.port, f"VERSION=40 {cmd} ", src) == b""
            assert await ask(env.port, f"VERSION=40 {cmd} ", src, udp=True, timeout=0.3) == b""
    assert env.counters["unknown_node"] >= 24


async def test_privkey_identifies_node(tmp_path) -> None:  # noqa: ANN001
    import tomllib

    import tomli_w
    from conftest import make_env, rich_testbed

    doc = tomllib.loads(rich_testbed())
    alloc = doc["experiments"][0]["nodes"][1]["node_id"]
    node = next(n for n in doc["nodes"] if n["node_id"] == alloc)
    node["privkey"] = "c0ffee" * 8
    env = await make_env(tmp_path, text=tomli_w.dumps(doc))
    try:
        out = await ask(env.port, f"VERSION=40 PRIVKEY={'c0ffee' * 8} status ", "127.0.0.9")
        assert out == b"ALLOCATED=proj0/exp0 NICKNAME=node1\n"
        assert await ask(env.port, "VERSION=40 PRIVKEY=deadbeef status ", "127.0.0.9") == b""
    finally:
        await env.wiring.stop()
        await env.live.stop()


async def test_secrets_never_over_udp(env) -> None:  # noqa: ANN001
    host = _host(env)
    ip = host.control_ip
    assert await ask(env.port, "VERSION=40 accounts ", ip, udp=True, timeout=0.3) == b""
    assert await ask(env.port, "VERSION=40 ipodinfo ", ip, udp=True, timeout=0.3) == b""
    full_udp = (await ask(env.port, "VERSION=40 fullconfig ", ip, udp=True)).decode()
    secs = split_fullconfig(full_udp)
    # As tmcd: every section's markers, the secret and TCP-only ones empty.
    assert secs["accounts"] == secs["ipodinfo"] == secs["keyhash"] == ""
    assert "ADDUSER" not in full_udp and "PUBKEY" not in full_udp and "HASH=" not in full_udp
    assert "$6$" not in full_udp and "KEYHASH" not in full_udp
    assert secs["mounts"]  # the rest is there
    # Over TCP the same node gets them.
    assert b"ADDUSER" in await ask(env.port, "VERSION=40 accounts ", ip)
    # Non-secret commands work over UDP, also on the fallback port.
    assert await ask(env.fallback, "VERSION=40 status ", ip, udp=True) == \
        b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"
    assert env.counters["udp_secret_refused"] == 2


async def test_tls_prefix_is_recognised_and_closed(env) -> None:  # noqa: ANN001
    host = _host(env)
    r, w = await asyncio.open_connection("127.0.0.1", env.port, local_addr=(host.control_ip, 0))
    w.write(b"ISPEAKSSL_TMCDV10")  # then a TLS client would wait for the handshake
    assert await asyncio.wait_for(r.read(), 2.0) == b""
    w.close()
    assert env.counters["tls_refused"] == 1


async def test_long_request_and_garbage_are_closed(env) -> None:  # noqa: ANN001
    ip = _host(env).control_ip
    assert await ask(env.port, b"A" * 10000, ip) == b""
    assert await ask(env.port, b"\x00\xff\xfe garbage\n", ip) == b""
    assert await ask(env.port, b"VERSION=x status\n", ip) == b""
    assert await ask(env.port, b"\n", ip) == b""
    assert env.counters["malformed"] >= 4
    assert await ask(env.port, "VERSION=40 status ", ip) == b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"


async def test_read_timeout_closes_silent_client(tmp_path) -> None:  # noqa: ANN001
    from conftest import make_env

    env = await make_env(tmp_path, extra=["tmcd.read_timeout=0.3"])
    try:
        ip = env.allocated()[0].control_ip
        r, w = await asyncio.open_connection("127.0.0.1", env.port, local_addr=(ip, 0))
        w.write(b"VERSION=40 sta")  # never finished
        # Reset, not closed: an empty reply ended by a FIN would look like success.
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(r.read(), 3.0)
        w.close()
        for _ in range(100):  # the native front's counters reach Python when it wakes it
            if env.counters["timeouts"]:
                break
            await asyncio.sleep(0.01)
        assert env.counters["timeouts"] == 1
    finally:
        await env.wiring.stop()
        await env.live.stop()


async def test_connection_cap_queues_instead_of_refusing(tmp_path) -> None:  # noqa: ANN001
    from conftest import make_env

    # The Python transport's slots (the native front reads every connection it holds).
    env = await make_env(tmp_path, extra=["tmcd.max_connections=2", "tmcd.read_timeout=1.0",
                                          "tmcd.native_front=false"])
    try:
        nodes = env.allocated()
        # Two slow clients take both slots...
        slow = []
        for n in nodes[:2]:
            s = socket.create_connection(("127.0.0.1", env.port), source_address=(n.control_ip, 0))
            slow.append(s)
        await asyncio.sleep(0.05)
        # ...yet ten more requests are queued and all answered once the slots free up.
        outs = await asyncio.gather(*(ask(env.port, "VERSION=40 status ", n.control_ip)
                                      for n in nodes[2:12]))
        assert all(o.startswith(b"ALLOCATED=") for o in outs), (outs, env.counters)
        assert env.counters["queued"] >= 1
        for s in slow:
            s.close()
    finally:
        await env.wiring.stop()
        await env.live.stop()


async def test_native_front_beyond_its_connections_resets(tmp_path) -> None:  # noqa: ANN001
    from conftest import make_env

    from bootherd.tmcd import front

    if not front.available:
        pytest.skip("bootherd._tmcdfront not built")
    # max_connections 1 + 8 x 1 queued: 9 connections open at most; the 10th is reset.
    env = await make_env(tmp_path, extra=["tmcd.max_connections=1", "tmcd.read_timeout=2.0"])
    try:
        nodes = env.allocated()
        slow = [socket.create_connection(("127.0.0.1", env.port),
                                         source_address=(n.control_ip, 0)) for n in nodes[:9]]
        await asyncio.sleep(0.2)
        with pytest.raises(ConnectionResetError):
            await ask(env.port, "VERSION=40 status ", nodes[9].control_ip)
        for s in slow:
            s.close()
        await asyncio.sleep(0.2)  # the front sees the slow ones go
        assert (await ask(env.port, "VERSION=40 status ", nodes[9].control_ip)).startswith(
            b"ALLOCATED=")
        for _ in range(100):
            if env.counters["overflow"]:
                break
            await asyncio.sleep(0.01)
        assert env.counters["overflow"] == 1
    finally:
        await env.service.stop()
        await env.live.stop()


async def test_fallback_port_serves_tcp(env) -> None:  # noqa: ANN001
    ip = _host(env).control_ip
    assert await ask(env.fallback, "VERSION=40 status ", ip) == \
        b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"


async def test_request_ended_by_space_without_halfclose(env) -> None:  # noqa: ANN001
    # Old clients and `nc` without -N neither send a newline nor half-close.
    ip = _host(env).control_ip
    r, w = await asyncio.open_connection("127.0.0.1", env.port, local_addr=(ip, 0))
    w.write(b"VERSION=40 status ")
    assert await asyncio.wait_for(r.read(), 3.0) == b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"
    w.close()
