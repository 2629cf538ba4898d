"""TMCD over real sockets, on a generated testbed: the transport hands out the core's
bytes unchanged, every reply satisfies Emulab's client scripts, events reach the
inventory.  Exact formats per command are in test_tmcd_core.py."""

from __future__ import annotations

import re

from conftest import ask
from test_tmcd_core import CLIENT

from bootherd.tmcd.protocol import COMMAND_TABLE, EVENT, FULLCONFIG_SECTIONS, split_fullconfig
from bootherd.tmcd.server import TmcdCore


def _host(env):  # noqa: ANN001, ANN202
    """node0 of experiment 0: has vnodes, a tunnel, a trafgen and a shaped link."""
    snap = env.snap
    return next(n for n in snap.nodes.values() if n.allocation and n.allocation.vname == "node0"
                and (n.allocation.pid, n.allocation.eid) == ("proj0", "exp0"))


async def q(env, node, cmd: str, udp: bool = False) -> bytes:  # noqa: ANN001
    return await ask(env.port, f"VERSION=40 {cmd} ", node.control_ip, udp=udp, timeout=1.0)


async def test_socket_reply_is_the_core_reply(env) -> None:  # noqa: ANN001
    """Every query command, over TCP and UDP, for an allocated and a free node."""
    core = TmcdCore(env.service.views, trusted=env.ctx.config.tmcd.trusted_ranges)
    answered = set()
    for cmd, c in COMMAND_TABLE.items():
        if c.has(EVENT):
            continue
        for n in (_host(env), env.free()[0]):
            for udp in (False, True):
                line = f"VERSION=40 {cmd} "
                want = core.handle(line.encode(), n.control_ip, env.snap, udp,
                                   server="127.0.0.1").reply
                # (a datagram that should not come is waited for briefly)
                got = await ask(env.port, line, n.control_ip, udp=udp,
                                timeout=2.0 if want or not udp else 0.05)
                assert got == want, (n.node_id, cmd, udp)
                if got:
                    answered.add(cmd)
    assert {"fullconfig", "accounts", "topomap", "hostnames", "ifconfig"} <= answered


async def test_generated_testbed_satisfies_the_client_scripts(env) -> None:  # noqa: ANN001
    for n in env.allocated():
        for cmd, pattern in CLIENT.items():
            text = (await q(env, n, cmd if cmd != "accounts" else "accounts pubkeys")).decode()
            for line in text.splitlines():
                assert re.fullmatch(pattern, line), (n.node_id, cmd, line)


async def test_awkward_generated_data_verbatim(env) -> None:  # noqa: ANN001
    """generate() puts quotes of both kinds in names, key comments and start commands."""
    snap = env.snap
    seen = set()
    for n in env.allocated():
        exp = snap.experiment_of(n)
        text = (await q(env, n, "accounts pubkeys")).decode()
        for login, _ in exp.members:
            u = snap.users[login]
            if '"' in u.name and "'" in u.name:
                assert f' NAME="{u.name}" ' in text
                seen.add("name")
            for k in u.keys:
                assert f'PUBKEY LOGIN={login} KEY="{k}"\n' in text
                if '"' in k:
                    seen.add("key")
        cmd = (await q(env, n, "startupcmd")).decode()
        if "'" in exp.startupcmd:
            assert cmd == f"CMD='{exp.startupcmd}' UID={exp.swapper}\n"
            seen.add("cmd")
    assert seen == {"name", "key", "cmd"}


async def test_fullconfig_matches_single_commands(env) -> None:  # noqa: ANN001
    n = _host(env)
    text = (await q(env, n, "fullconfig")).decode()
    secs = split_fullconfig(text)
    assert list(secs) == list(FULLCONFIG_SECTIONS)
    for name in FULLCONFIG_SECTIONS:
        assert secs[name].encode() == await q(env, n, name), name
    assert await q(env, env.free()[0], "fullconfig") == b""  # tmcd: allocated nodes only


async def test_bootwhat_is_the_boot_policy(env) -> None:  # noqa: ANN001
    assert await q(env, _host(env), "bootwhat") == b"STATUS=success TYPE=1 FLAGS=0 WHAT=1\n"
    assert await q(env, env.free()[0], "bootwhat") == b"STATUS=success TYPE=4 FLAGS=0\n"


async def test_state_reboot_isalive(env) -> None:  # noqa: ANN001
    n = _host(env)
    assert await q(env, n, "state TBSETUP") == b""
    assert env.live.state_of(n.node_id)[0] == "TBSETUP"
    assert await q(env, n, "reboot") == b""
    assert env.live.state_of(n.node_id)[0] == "TBSETUP"  # reboot is not a state
    assert await q(env, n, "state bad;state") == b""
    assert env.live.state_of(n.node_id)[0] == "TBSETUP"
    assert await q(env, n, "isalive", udp=True) == b"UPDATE=0\n"
    assert await q(env, n, "rusage LA1=0.5 LA5=0.4 LA15=0.3 DUSED=12", udp=True) == b"UPDATE=0\n"
    # What the node holds counts as current: the lifecycle coordinator remembers it.
    assert env.wiring.lifecycle.core.life[n.node_id].digest == \
        env.service.views.digest(env.snap, n)


async def test_render_cache_one_render_per_node(env) -> None:  # noqa: ANN001
    views = env.service.views
    n = _host(env)
    before = views.renders
    for cmd in ("fullconfig", "accounts", "mounts", "ifconfig", "hostnames", "isalive",
                "fullconfig"):
        await q(env, n, cmd)
    assert views.renders - before <= 1


async def test_unknown_command_gets_nothing(env) -> None:  # noqa: ANN001
    assert await q(env, _host(env), "frobnicate") == b""
    assert await q(env, _host(env), "geni_client_id") == b""
    assert env.counters["unknown_command"] == 2
