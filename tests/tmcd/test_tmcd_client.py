"""tmcc: boot-time cache, cache hits, fallback port, the isalive refresh loop, the proxy."""

from __future__ import annotations

import asyncio
import os
import stat

from sqlalchemy import update

from bootherd.inventory import schema as s
from bootherd.tmcd.client import TmccClient, TmccError, main
from bootherd.tmcd.protocol import FULLCONFIG_SECTIONS, SECRET_SECTIONS, VNODE_SECTIONS
from bootherd.tmcd.proxy import TmccProxy


def _host(env):  # noqa: ANN001, ANN202
    return next(n for n in env.snap.nodes.values() if env.snap.vnodes.get(n.node_id))


def _client(env, node, **kw) -> TmccClient:  # noqa: ANN001
    return TmccClient(server="127.0.0.1", port=env.port, fallback_port=env.fallback,
                      bind=node.control_ip, cachedir=str(env.tmp / f"cache-{node.node_id}"),
                      timeout=3.0, **kw)


async def test_boot_fills_cache_with_modes(env) -> None:  # noqa: ANN001
    n = _host(env)
    c = _client(env, n)
    status = await asyncio.to_thread(c.boot)
    assert status == b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"
    d = c.cache_path
    for name in FULLCONFIG_SECTIONS:
        mode = stat.S_IMODE(os.stat(d / name).st_mode)
        assert mode == (0o600 if name in SECRET_SECTIONS else 0o644), name
    assert {"accounts", "ipodinfo", "keyhash", "eventkey"} <= SECRET_SECTIONS
    assert (d / "accounts").read_bytes().startswith(b"ADDGROUP NAME=proj0")
    # One status and one fullconfig went to the server.
    assert env.counters["cmd_status"] == 1 and env.counters["cmd_fullconfig"] == 1
    # Later calls without arguments come from the cache, not the server.
    before = env.counters["requests"]
    for name in ("accounts", "mounts", "ifconfig", "tarballs"):
        live = await asyncio.to_thread(c.request, name)
        assert await asyncio.to_thread(c.get, name) == live
    assert env.counters["requests"] - before == 4  # only the explicit live requests
    # -b bypasses; arguments always go to the server; status is never cached.
    await asyncio.to_thread(c.get, "accounts", "", True)
    await asyncio.to_thread(c.get, "state", "ISUP")
    await asyncio.to_thread(c.get, "status")
    assert env.counters["requests"] - before == 7
    assert env.live.state_of(n.node_id)[0] == "ISUP"


# The 26 requests a node booting under Emulab sent one by one (docs/tmcd.md).
ORIGINAL_BOOT = ["status", "ntpinfo", "mounts", "accounts", "ifconfig", "tunnels", "hostnames",
                 "routing", "routelist", "trafgens", "nseconfigs", "rpms", "tarballs",
                 "startupcmd", "delay", "ipodinfo", "vnodelist", "isalive", "creator",
                 "nodeid", "role", "keyhash", "eventkey", "syncserver", "watchdoginfo",
                 "firewallinfo"]


async def test_boot_round_trip_is_byte_identical(env) -> None:  # noqa: ANN001
    """tmcc boot: one fullconfig split into the cache; each cached file is byte for
    byte the server's answer to that command asked alone."""
    n = _host(env)
    c = _client(env, n)
    await asyncio.to_thread(c.boot)
    cached = {name: c.cached(name) for name in FULLCONFIG_SECTIONS}
    assert all(v is not None for v in cached.values())
    for name in ORIGINAL_BOOT:
        live = await asyncio.to_thread(c.request, name)
        if name in cached:
            assert cached[name] == live, name
        else:
            assert c.cached(name) is None  # status, hostnames, isalive: always live
    assert cached["accounts"].startswith(b"ADDGROUP ") and cached["keyhash"]
    # The same for a vnode through its host (VNODEID), into its own cache folder.
    vid = env.snap.vnodes[n.node_id][0]
    vc = _client(env, n, vnode=vid)
    await asyncio.to_thread(vc.boot)
    for name in VNODE_SECTIONS:
        assert vc.cached(name) == await asyncio.to_thread(vc.request, name), name
    assert vc.cache_path != c.cache_path and vc.cached("ntpinfo") is None


async def test_free_node_boot_caches_nothing(env) -> None:  # noqa: ANN001
    f = env.free()[0]
    c = _client(env, f)
    assert await asyncio.to_thread(c.boot) == b"FREE\n"
    assert c.cached("accounts") is None
    assert env.counters["cmd_fullconfig"] == 0


async def test_fallback_only_on_refused(env) -> None:  # noqa: ANN001
    from bootherd.procs import free_port

    n = _host(env)
    dead = free_port()  # nothing listens there: refused, so the fallback answers
    c = TmccClient(port=dead, fallback_port=env.fallback, bind=n.control_ip, timeout=3.0)
    assert await asyncio.to_thread(c.request, "status") == b"ALLOCATED=proj0/exp0 NICKNAME=node0\n"
    c2 = TmccClient(port=dead, fallback_port=0, bind=n.control_ip, timeout=1.0)
    try:
        await asyncio.to_thread(c2.request, "status")
        raise AssertionError("expected TmccError")
    except TmccError:
        pass


async def test_refresh_loop_end_to_end(env) -> None:  # noqa: ANN001
    n = _host(env)
    c = _client(env, n)
    await asyncio.to_thread(c.boot)
    assert b"Renamed Person" not in c.cached("accounts")
    # Nothing changed: the watchdog does not refetch.
    assert await asyncio.to_thread(c.watchdog_once) is False
    fetches = env.counters["cmd_fullconfig"]
    # An operator renames a member of the node's experiment.
    login = env.snap.experiments[("proj0", "exp0")].members[0][0]
    with env.live.engine.begin() as conn:
        conn.execute(update(s.users).where(s.users.c.login == login)
                     .values(name="Renamed Person", serial=2))
    assert await env.live.refresh()
    # isalive (UDP) now says UPDATE=1, until the node refetches.
    assert await asyncio.to_thread(c.request, "isalive", "", True) == b"UPDATE=1\n"
    assert await asyncio.to_thread(c.watchdog_once) is True
    assert env.counters["cmd_fullconfig"] == fetches + 1
    assert b'NAME="Renamed Person"' in c.cached("accounts")
    assert await asyncio.to_thread(c.request, "isalive", "", True) == b"UPDATE=0\n"
    # The main() entry point: watchdog rounds, then a cached read.
    rc = await asyncio.to_thread(main, ["-s", "127.0.0.1", "-p", str(env.port), "-l",
                                        n.control_ip, "-c", c.cachedir, "watchdog",
                                        "--count", "1", "--interval", "0"])
    assert rc == 0


async def test_watchdog_retries_then_gives_up(env) -> None:  # noqa: ANN001
    from bootherd.procs import free_port

    n = _host(env)
    c = TmccClient(port=free_port(), fallback_port=0, bind=n.control_ip, timeout=0.2)
    assert await asyncio.to_thread(c.isalive, 2) is None
    assert await asyncio.to_thread(c.watchdog, 0, 2, 2) == 0


async def test_main_prints_reply(env, capsysbinary) -> None:  # noqa: ANN001
    n = _host(env)
    rc = await asyncio.to_thread(main, ["-s", "127.0.0.1", "-p", str(env.port), "-l",
                                        n.control_ip, "-c", str(env.tmp / "c"), "-b",
                                        "creator"])
    assert rc == 0
    assert capsysbinary.readouterr().out.startswith(b"CREATOR=")


async def test_proxy_serves_vnodes_from_one_cache(env) -> None:  # noqa: ANN001
    host = _host(env)
    v0, v1 = env.snap.vnodes[host.node_id]
    sock = str(env.tmp / "tmcc.sock")
    proxy = TmccProxy(_client(env, host), sock)
    proxy.start()
    try:
        vc = TmccClient(proxy_socket=sock, vnode=v0, timeout=3.0)
        out = await asyncio.to_thread(vc.request, "accounts")
        assert out.startswith(b"ADDGROUP NAME=proj0")
        out = await asyncio.to_thread(vc.request, "ifconfig")
        assert proxy.fetches == 1  # one fullconfig for v0 answered both
        assert await asyncio.to_thread(vc.request, "status") == \
            b"ALLOCATED=proj0/exp0 NICKNAME=vm0\n"  # forwarded with PROXYFOR
        assert proxy.forwarded == 1
        vc1 = TmccClient(proxy_socket=sock, vnode=v1, timeout=3.0)
        assert (await asyncio.to_thread(vc1.request, "status")).endswith(b"NICKNAME=vm1\n")
        assert (env.tmp / f"cache-{host.node_id}" / "vnodes" / v0 / "accounts").exists()
        # A vnode of another host: the server refuses the proxy's PROXYFOR.
        other = next(n for n in env.snap.nodes.values() if n.node_id not in (v0, v1)
                     and n.allocation)
        bad = TmccClient(proxy_socket=sock, vnode=other.node_id, timeout=3.0)
        assert await asyncio.to_thread(bad.request, "status") == b""
    finally:
        proxy.close()


async def test_pinned_proxy_refuses_other_vnodes(env) -> None:  # noqa: ANN001
    host = _host(env)
    v0, v1 = env.snap.vnodes[host.node_id]
    sock = str(env.tmp / "pinned.sock")
    proxy = TmccProxy(_client(env, host), sock, pinned_vnode=v0)
    proxy.start()
    try:
        assert (await asyncio.to_thread(TmccClient(proxy_socket=sock, timeout=3.0).request,
                                        "status")).endswith(b"NICKNAME=vm0\n")
        assert await asyncio.to_thread(TmccClient(proxy_socket=sock, vnode=v1,
                                                  timeout=3.0).request, "status") == b""
    finally:
        proxy.close()
